"""Run the queue's serving in a daemon thread of the training process, ahead of the consumer.

With workers, the training process receives each subject's patches (mapping the worker's shared block,
pinning it or copying the patches out, rebuilding their metadata: up to half a millisecond per patch of 64^3
image and label on a loaded 2-core machine) and serves them, laid out in slabs when batches are collated from them
(:mod:`.slabs`). Done on the training thread, that work fell between training steps whenever the queue was read
by torch's plain ``DataLoader``. :class:`Receiver` iterates over such a stream in a daemon thread, producing an
item only while fewer than ``ahead`` wait for the consumer; the consumer takes them in the same order, so the
stream is unchanged. With workers, one receiver unpacks subjects ahead of the serving and another serves them
ahead of the consumer. Failures (a subject that could not be prepared, a worker that died) reach the consumer in
their place.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

__all__ = ["Receiver", "ReceiverStopped"]

_POLL_S = 0.05


class ReceiverStopped(RuntimeError):
    """Raised to a consumer whose receiver was stopped (the queue closed or reseeded, or a newer iteration)."""


class _Failure:
    """An exception raised while receiving, handed to the consumer in its place in the order."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Receiver:
    """Iterate over ``items`` in a daemon thread named ``name``, at most ``ahead`` items ahead of :meth:`next`.

    Example:
        >>> receiver = Receiver(iter(["a", "b"]), ahead=1)
        >>> receiver.next(), receiver.next()
        ('a', 'b')
        >>> receiver.stop()
    """

    def __init__(self, items: Iterator, ahead: int, name: str = "PatchQueueDataset receiver") -> None:
        self._items = items
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.Semaphore(ahead)  # one per item made and not yet taken
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._receive, name=name, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stopping.is_set():
            if not self._slots.acquire(timeout=_POLL_S):
                continue
            try:
                item: object = next(self._items)
            except BaseException as error:  # every failure (and the end) goes to the consumer, in its place
                item = _Failure(error)
            if self._stopping.is_set():
                return
            self._ready.put(item)
            if isinstance(item, _Failure):
                return

    def next(self) -> object:
        """Return the next item, waiting for it; raise what producing it raised."""
        while True:
            try:
                item = self._ready.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if self._stopping.is_set():  # e.g. a thread reading from this one, stopped with it, ends too
                    raise ReceiverStopped(
                        "this iteration of the PatchQueueDataset was stopped: the queue was closed or reseeded, or "
                        "a newer iteration of it started. With workers a queue serves one iteration at a time: "
                        "finish or drop an iterator before you ask for the next"
                    ) from None
                if not self._thread.is_alive() and self._ready.empty():
                    raise RuntimeError("PatchQueueDataset's receiver stopped; please report this") from None
        self._slots.release()
        if isinstance(item, _Failure):
            raise item.error
        return item

    def stop(self, wait: bool = True) -> None:
        """Stop receiving and drop what was received; with ``wait``, return once the thread has finished (it
        first finishes an item it is producing, so that the iterator can be reused)."""
        self._stopping.set()
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        if wait:
            self.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (at most ``timeout`` seconds); return whether it has."""
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()
