"""Receive the workers' results and unpack them in a thread of the training process, ahead of the consumer.

Unpacking a subject's patches (mapping the worker's shared block, copying the patches out, rebuilding their
metadata) costs about half a millisecond per patch of 64^3 image and label on a loaded 2-core machine. Done
when the buffer admits the subject, it ran on the training thread between training steps whenever the queue was
read by torch's plain ``DataLoader``. :class:`Receiver` pulls results in order from the worker pool's iterator and
unpacks them in a daemon thread, keeping at most ``ahead`` unpacked results waiting; the consumer takes them
in the same order, so the stream is unchanged. Failures (a subject that could not be prepared, a worker that
died) reach the consumer in their place in the order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

__all__ = ["Receiver"]

_POLL_S = 0.05


class _Failure:
    """An exception raised while receiving, handed to the consumer in its place in the order."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Receiver:
    """Iterate over ``results`` (``(task, pack)`` pairs) in a daemon thread and yield ``(task, pack.unpack())``.

    Example:
        >>> from monai_patchqueue.data.transport import PatchPack
        >>> results = iter([("a", PatchPack([{"x": 1}])), ("b", PatchPack([{"x": 2}]))])
        >>> receiver = Receiver(results, ahead=1)
        >>> [(task, patches[0]["x"]) for task, patches in (receiver.next(), receiver.next())]
        [('a', 1), ('b', 2)]
        >>> receiver.stop()
    """

    def __init__(self, results: Iterator, ahead: int) -> None:
        self._results = results
        self._ready: queue.Queue = queue.Queue(maxsize=ahead)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="PatchQueueDataset receiver", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stopping.is_set():
            try:
                task, pack = next(self._results)
                item: object = (task, pack.unpack())
            except BaseException as error:  # every failure goes to the consumer, in its place
                item = _Failure(error)
            if not self._hand_over(item) or isinstance(item, _Failure):
                return

    def _hand_over(self, item: object) -> bool:
        while not self._stopping.is_set():
            try:
                self._ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple:
        """Return the next ``(task, patches)``, waiting for it; raise what receiving it raised."""
        while True:
            try:
                item = self._ready.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._ready.empty():
                    raise RuntimeError("PatchQueueDataset's receiver stopped; please report this") from None
        if isinstance(item, _Failure):
            raise item.error
        return item

    def stop(self, wait: bool = True) -> None:
        """Stop receiving and drop what was received; with ``wait``, return once the thread has finished (it
        first finishes a result it is waiting for, so that the iterator can be reused)."""
        self._stopping.set()
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        if wait and self._thread is not threading.current_thread():
            self._thread.join()
