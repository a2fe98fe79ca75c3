"""Run subject tasks ahead of the consumer, in worker processes, across epoch boundaries.

A ``torch.utils.data.DataLoader`` over :class:`SubjectPatches` is the worker pool: it returns results in task
order, bounds the work in flight (``prefetch_factor`` tasks per worker), re-raises worker exceptions in the
calling process, notices workers killed by a signal, and shuts its processes down when closed or collected.
Its index sampler is an endless stream of tasks, epoch after epoch, so the workers keep preparing the next
epoch's first subjects while the current epoch's last patches are consumed.

With workers, two daemon threads of the training process unpack and serve those results ahead of the consumer
(see :mod:`.receiver`). The unpacking thread waits for the workers' next result in slices of
``RESULT_POLL_S`` (the DataLoader's ``timeout``; a wait that times out is resumed), so that it ends once the
workers are shut down rather than waiting forever. A daemon thread still inside torch's C++ code when the
interpreter finalizes aborts the process ("terminate called without an active exception"), and a script that
never closes its queue leaves both threads working on the next epoch; so every open :class:`BackgroundTasks`
is closed at exit and its threads are waited for, and closing waits until neither thread can enter torch
again.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import weakref
from collections.abc import Iterator, Mapping
from functools import partial

import torch
from torch.utils.data import DataLoader, get_worker_info

from .block_lender import BlockLender
from .block_pins import BlockPins, pinned_blocks_per_worker
from .planner import EpochPlanner
from .receiver import Receiver
from .schedule import SubjectTask
from .serving import EpochServer, slab_capacity
from .shared_blocks import BlockTicket, SharedBlocks, block_nbytes, close_returns, open_returns
from .slabs import ServedPatch
from .subject_patches import SubjectPatches, patch_nbytes
from .transport import PatchPack, pack_nbytes
from .worker_start import WorkerStart

__all__ = ["BackgroundTasks"]

PREFETCH_PER_WORKER = 2
BLOCKS_PER_WORKER = PREFETCH_PER_WORKER + 2  # results queued, the one being packed, one on its way back
_THREAD_EXIT_S = 2.0
"""How long closing waits for the serving thread to end (it does within a poll once the unpacking stops), and
for the unpacking thread to finish the subject it is unpacking."""
RESULT_POLL_S = 0.25
"""How often the unpacking thread, waiting for a result, checks whether the workers were shut down."""
_TIMED_OUT = "DataLoader timed out"  # how torch's DataLoader says that a wait of `timeout` seconds ran out
SUBJECTS_UNPACKED_AHEAD = 1
"""Subjects a thread of the training process unpacks ahead of the serving (one waiting, or being unpacked)."""
SLABS_AHEAD = 1
"""Slabs the receiver thread fills ahead of the consumer (it starts the next one when the consumer takes it)."""
_SLABS_HELD = SLABS_AHEAD + 1  # outside the buffer: the one being served, the one filled (or filling) ahead


def subjects_in_flight(num_workers: int) -> int:
    """Return the most subjects whose patches are held outside the queue's buffer and slabs: prefetched by the
    workers, and the one being unpacked in the training process; none without workers.

    Example:
        >>> subjects_in_flight(0), subjects_in_flight(2)
        (0, 5)
    """
    return PREFETCH_PER_WORKER * num_workers + 1 if num_workers else 0


def patches_in_slabs(max_length: int) -> int:
    """Return the most patches held in slabs outside the buffer: the one being served and the one ahead.

    Example:
        >>> patches_in_slabs(64), patches_in_slabs(4)
        (32, 8)
    """
    return _SLABS_HELD * slab_capacity(max_length)


def memory_outside_buffer(num_workers: int, patch: Mapping, count: int, max_length: int) -> int:
    """Return the most bytes the queue holds outside its buffer, for subjects of ``count`` patches shaped like
    ``patch``.

    That is the slabs (:func:`patches_in_slabs`) and, with workers, the subject being unpacked in the training
    process and the workers' shared-memory pools: per worker, ``BLOCKS_PER_WORKER`` blocks for the prefetched
    subjects and those the training process may hold pinned (:func:`.pinned_blocks_per_worker`), each sized for
    a subject's pack and rounded up to whole MiB (they keep their size once used). The buffer's patches are
    counted apart, as if all were copied out, although those served from pinned blocks are not.

    Example:
        >>> patch = {"image": torch.zeros(1, 4, 4, 4)}  # 256 bytes
        >>> memory_outside_buffer(0, patch, 16, max_length=64)  # two slabs of 16 patches
        8192
        >>> memory_outside_buffer(2, patch, 16, max_length=64) // 2**20  # and 2 x (4 + 6) blocks of 1 MiB
        20
    """
    slabs = patches_in_slabs(max_length) * patch_nbytes(patch)
    if not num_workers:
        return slabs
    received = count * patch_nbytes(patch)
    blocks = BLOCKS_PER_WORKER + pinned_blocks_per_worker(max_length, count, num_workers)
    return num_workers * blocks * block_nbytes(pack_nbytes(patch, count)) + received + slabs


def _unchanged(result):
    return result


class _PackedWork(torch.utils.data.Dataset):
    """Runs the work in a worker process and packs the patches for the trip back (see :mod:`.transport`), into
    the worker's reusable shared-memory blocks, which come back through ``returns[worker id]``.

    From the second subject on, the block is lent to the samplers before they cut the patches (see
    :mod:`.block_lender`), sized for the previous subject's pack, so that patches are written where they travel.
    A worker keeps up to ``capacity`` blocks: those in flight and those the training process holds pinned.
    """

    def __init__(self, work: SubjectPatches, token: int, returns: list, capacity: int = BLOCKS_PER_WORKER) -> None:
        self.work = work
        self.token = token
        self.returns = returns
        self.capacity = capacity
        self._blocks: SharedBlocks | None = None
        self._worker = -1
        self._last_nbytes = 0  # the previous pack's size: what the next subject will likely need

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, task: SubjectTask) -> tuple[SubjectTask, PatchPack]:
        lender = self._lender()
        try:
            task, patches = self.work.prepare(task, lender, packed=True)
            pack = PatchPack(patches, self._take_block, lender)
        except BaseException:
            if lender is not None:
                lender.release()
            raise
        self._last_nbytes = pack.nbytes
        return task, pack

    def _lender(self) -> BlockLender | None:
        if not self._last_nbytes:
            return None
        block, ticket = self._take_block(self._last_nbytes)
        if ticket is None:  # every pooled block is out: a one-off block is no better than the pack's own
            return None
        return BlockLender(block, ticket, release=partial(self._blocks.give_back, ticket.block))

    def _take_block(self, nbytes: int) -> tuple[torch.Tensor, BlockTicket | None]:
        if self._blocks is None:
            self._worker = get_worker_info().id
            self._blocks = SharedBlocks(self.returns[self._worker], capacity=self.capacity)
        block, index = self._blocks.take(nbytes)
        if index is None:
            return block, None
        return block, BlockTicket(self.token, self._worker, index, mapped=self._blocks.mapped_there(index))


_OPEN: weakref.WeakSet = weakref.WeakSet()
"""Every BackgroundTasks not yet closed, closed at exit (before torch's own exit handler, registered earlier)."""
_ENDING: weakref.WeakSet = weakref.WeakSet()
"""The threads of closed BackgroundTasks that may still be running, each for at most ``RESULT_POLL_S``."""


@atexit.register
def _close_open_backgrounds() -> None:
    for background in list(_OPEN):
        background.close()
    for thread in list(_ENDING):
        thread.join(timeout=RESULT_POLL_S + _THREAD_EXIT_S)


def _unpacked_results(
    iterator: Iterator, closed: threading.Event, unpacking: threading.Lock, pins: BlockPins | None
) -> Iterator:
    """Yield ``iterator``'s ``(task, result)`` pairs, results unpacked (serving views of blocks that ``pins``
    lets them pin); end once ``closed`` is set.

    Before each wait for a result, the pinned blocks whose patches are all gone go back to their workers. A wait
    that times out is resumed: torch's DataLoader raises before changing its iterator's state.
    """
    while True:
        if pins is not None:
            pins.return_released()
        try:
            task, result = next(iterator)
        except RuntimeError as error:
            if _TIMED_OUT not in str(error):
                raise
            if closed.is_set():
                return
            continue
        if isinstance(result, PatchPack):
            with unpacking:  # close() takes it for good: no unpacking once the workers are shut down
                result = result.unpack(pins)
        yield task, result


class _TaskStream:
    """Endless iterable of tasks: epoch ``first_epoch``'s plan, then the next epoch's, and so on."""

    def __init__(self, planner: EpochPlanner) -> None:
        self.planner = planner
        self.first_epoch = 0

    def __iter__(self) -> Iterator[SubjectTask]:
        epoch = self.first_epoch
        while True:
            yield from self.planner.tasks(epoch)
            epoch += 1


class BackgroundTasks:
    """Results of the planned tasks, in plan order, computed by ``num_workers`` processes (0: on demand), and
    served by ``server`` in slabs (with workers, in a thread of this process, ahead of the consumer).

    With workers and ``pins``, received blocks are pinned to serve their patches as views while ``pins`` allows
    (see :mod:`.block_pins`); the others' patches are copied out.

    Example:
        >>> import torch
        >>> from monai_patchqueue import UniformSamplerd
        >>> work = SubjectPatches([{"image": torch.zeros(1, 8, 8, 8)}] * 2, UniformSamplerd("image", 4))
        >>> background = BackgroundTasks(work, EpochPlanner([3, 3], seed=0, shuffle_subjects=False), num_workers=0)
        >>> results = background.results(epoch=0)
        >>> [len(next(results)[1]) for _ in range(2)]
        [3, 3]
        >>> background.close()
    """

    def __init__(
        self,
        work: SubjectPatches,
        planner: EpochPlanner,
        num_workers: int,
        server: EpochServer | None = None,
        pins: BlockPins | None = None,
    ) -> None:
        self.planner = planner
        self.num_workers = num_workers
        self.server = server
        self._pins = pins if num_workers > 0 else None
        self._stream = _TaskStream(planner)
        self._returns_token, returns = open_returns(num_workers)
        capacity = BLOCKS_PER_WORKER + (self._pins.per_worker if self._pins is not None else 0)
        self._loader = DataLoader(
            _PackedWork(work, self._returns_token, returns, capacity) if num_workers > 0 else work,
            batch_size=None,
            sampler=self._stream,
            num_workers=num_workers,
            collate_fn=_unchanged,
            persistent_workers=num_workers > 0,
            timeout=RESULT_POLL_S if num_workers > 0 else 0,
            prefetch_factor=PREFETCH_PER_WORKER if num_workers > 0 else None,
        )
        self._iterator: Iterator | None = None
        self._receiver: Receiver | None = None  # with workers and a server: serves self._iterator's results ahead
        self._unpacker: Receiver | None = None  # and unpacks them ahead of the serving, in a thread of its own
        self._next: tuple | None = None
        self._unpacking = threading.Lock()  # held while a subject is unpacked; taken for good by close()
        self._closed = threading.Event()  # set by close(): the unpacking ends instead of waiting on

    def start(self, epoch: int) -> None:
        """Have the workers work on ``epoch`` from its start, keeping work already started for it."""
        position = (epoch, self.planner.rank_and_size())
        if self._iterator is None or self._next != position:
            self._stop_threads(wait=True)  # before the iterator is reset under them
            self._stream.first_epoch = epoch
            if self.num_workers > 0:  # workers start with the settings of this moment, as forked ones would
                self._loader.worker_init_fn = WorkerStart.of_this_process()
            self._iterator = iter(self._loader)
            self._unpacking, self._closed = threading.Lock(), threading.Event()
            _OPEN.add(self)
            if self.num_workers > 0 and self.server is not None:
                self._unpacker = Receiver(self._unpacked(), SUBJECTS_UNPACKED_AHEAD, name="PatchQueueDataset unpacker")
                self._receiver = Receiver(self._served_epochs(epoch, self._unpacker), ahead=SLABS_AHEAD)
        self._next = position

    def results(self, epoch: int) -> Iterator[tuple[SubjectTask, list[dict]]]:
        """Return the iterator of ``(task, patches)`` positioned at the start of ``epoch``, for a background
        without a server (whose receiver would be reading them).

        Work already started for that epoch is kept; anything else in flight is discarded.
        """
        if self.server is not None and self.num_workers > 0:
            raise RuntimeError("this BackgroundTasks serves its results in slabs: read them with slabs()")
        self.start(epoch)
        self._next = None
        return self._unpacked()

    def slabs(self, epoch: int) -> Iterator[list[ServedPatch]]:
        """Return the iterator of ``epoch``'s patches, a slab at a time, positioned at its start."""
        if self.server is None:
            raise RuntimeError("this BackgroundTasks has no server to lay its results out in slabs")
        self.start(epoch)
        self._next = None
        if self._receiver is None:
            return self.server.slabs(epoch, self._unpacked())
        return self._received_slabs(self._receiver, epoch)

    def _unpacked(self) -> Iterator[tuple[SubjectTask, list[dict]]]:
        return _unpacked_results(self._iterator, self._closed, self._unpacking, self._pins)

    def _served_epochs(self, first_epoch: int, unpacker: Receiver) -> Iterator[tuple[int, list[ServedPatch] | None]]:
        """Each epoch's slabs from ``first_epoch`` on, then ``(epoch, None)``: what the receiver thread runs."""
        results = iter(unpacker.next, None)  # the results never end: the task stream runs on
        for epoch in itertools.count(first_epoch):
            for slab in self.server.slabs(epoch, results):
                yield epoch, slab
            yield epoch, None

    @staticmethod
    def _received_slabs(receiver: Receiver, epoch: int) -> Iterator[list[ServedPatch]]:
        while True:
            served_epoch, slab = receiver.next()
            if served_epoch != epoch:
                raise RuntimeError(
                    f"PatchQueueDataset received epoch {served_epoch} while serving epoch {epoch}; please report this"
                )
            if slab is None:
                return
            yield slab

    def finished(self, epoch: int) -> None:
        """Record that every task of ``epoch`` was consumed, so the next epoch's work in flight is kept."""
        self._next = (epoch + 1, self.planner.rank_and_size())

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        _OPEN.discard(self)
        self._closed.set()
        iterator, self._iterator = self._iterator, None
        # without waiting: the unpacking may wait for a result that never comes (it ends within RESULT_POLL_S
        # of the workers' shutdown); the serving, waiting on it, ends within a poll
        threads = self._stop_threads(wait=False)
        self._next = None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if threads:
            threads[0].join(timeout=_THREAD_EXIT_S)
            # the unpacking finishes the subject in hand and unpacks no other; it ends within RESULT_POLL_S
            self._unpacking.acquire(timeout=_THREAD_EXIT_S)
            _ENDING.update(threads)
        self._loader._iterator = None
        close_returns(self._returns_token)
        if self._pins is not None:
            self._pins.close()

    def _stop_threads(self, wait: bool) -> list[Receiver]:
        """Stop the serving thread, then the unpacking (both or neither run); return them in that order."""
        threads = [thread for thread in (self._receiver, self._unpacker) if thread is not None]
        self._receiver = self._unpacker = None
        for thread in threads:  # the serving first: it reads from the unpacking
            thread.stop(wait=wait)
        return threads

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (empty before the first epoch starts or with ``num_workers=0``)."""
        workers = getattr(self._iterator, "_workers", [])
        return [worker.pid for worker in workers if worker.is_alive()]
