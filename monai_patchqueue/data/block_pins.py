"""Serve received patches as views of their worker's shared block, for as many blocks as a budget allows.

Copying each received patch out of its worker's block took 40-50% of the training process's CPU per patch on
the benchmark (a pass over every voxel, at this machine's low memory bandwidth). A pinned block skips it: the
patches are views of the block, and the block goes back to its worker once every tensor that views it is
gone (patches collated into a batch, slabs filled from them, patches dropped).

Patches that linger hold their whole block: a shuffled buffer keeps a few of each subject's patches for a long
while (about twelve subjects have patches in a buffer of four subjects' worth), and a training script may keep
some. So the queue's server keeps the patches of the ``kept`` most recently pinned blocks in its buffer as they
are and copies the buffered patches of older ones out (:func:`copied_out_of`, called with
:meth:`BlockPins.surplus`), which frees those blocks once their served patches are collated; and
:class:`BlockPins` pins at most ``per_worker`` blocks of each worker at a time, copying the patches of any other
out at once, as before. Each worker's pool has room for its pinned blocks on top of those in flight, so pinning
never has a worker make a one-off block.

When the last view of a pinned block dies (in whatever thread drops it, or in the garbage collector) a
finalizer only records it in a reentrant queue; :meth:`BlockPins.return_released`, called by the thread that
unpacks the workers' results before it waits for the next one, hands the block back to its worker.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
import weakref
from collections.abc import Mapping, Sequence

import torch
from monai.data import MetaTensor

from ..transforms.functional import new_metatensor
from .shared_blocks import BlockTicket, return_block
from .transport import copy_in_this_thread

__all__ = ["BlockPins", "copied_out_of", "kept_pinned_blocks", "pinned_blocks_per_worker"]

KEPT_SUBJECTS_PER_BUFFER = 2
"""Pinned blocks whose buffered patches stay views, per buffer's worth of subjects (``max_length /
samples_per_volume``): about nine patches in ten are then served without a copy."""
PINNED_IN_TRANSIT = 2
"""Pinned blocks per worker beyond its share of the kept ones: blocks whose buffered patches were copied out
wait for their served patches to be collated."""


def kept_pinned_blocks(max_length: int, samples_per_volume: int) -> int:
    """Return how many of the most recently pinned blocks keep their buffered patches as views.

    Example:
        >>> kept_pinned_blocks(64, 16), kept_pinned_blocks(64, 100)
        (8, 2)
    """
    return KEPT_SUBJECTS_PER_BUFFER * math.ceil(max_length / max(samples_per_volume, 1))


def pinned_blocks_per_worker(max_length: int, samples_per_volume: int, num_workers: int) -> int:
    """Return how many of each worker's blocks the training process may hold pinned at once (0 without workers):
    its share of the kept blocks (workers take subjects in turn) and ``PINNED_IN_TRANSIT``.

    Example:
        >>> pinned_blocks_per_worker(64, 16, num_workers=2), pinned_blocks_per_worker(64, 16, num_workers=0)
        (6, 0)
        >>> pinned_blocks_per_worker(64, 16, num_workers=3)  # 8 kept, 3 per worker rounded up, and 2
        5
    """
    if num_workers <= 0:
        return 0
    return math.ceil(kept_pinned_blocks(max_length, samples_per_volume) / num_workers) + PINNED_IN_TRANSIT


def copied_out_of(patch: Mapping, ranges: Sequence[tuple[int, int]]) -> Mapping:
    """Return ``patch`` with its tensors that view memory in ``ranges`` (``(start, end)`` addresses) replaced by
    copies (MetaTensors keep their metadata); ``patch`` itself when none does.

    Example:
        >>> block = torch.arange(8.0)
        >>> patch = {"image": block[2:4], "id": 1}
        >>> start = block.data_ptr()
        >>> copied = copied_out_of(patch, [(start, start + 32)])
        >>> copied["image"].tolist(), copied["image"].data_ptr() == patch["image"].data_ptr(), copied["id"]
        ([2.0, 3.0], False, 1)
        >>> copied_out_of(patch, [(start + 32, start + 64)]) is patch
        True
    """
    copied = None
    for key, value in patch.items():
        if isinstance(value, torch.Tensor) and _views(value, ranges):
            copied = dict(patch) if copied is None else copied
            copied[key] = _copy(value)
    return patch if copied is None else copied


def _views(tensor: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> bool:
    with torch._C.DisableTorchFunctionSubclass():  # plain attribute reads, without MONAI's dispatch
        if tensor.device.type != "cpu":
            return False
        address = tensor.data_ptr()
    return any(start <= address < end for start, end in ranges)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, MetaTensor):
        return new_metatensor(copy_in_this_thread(tensor.as_tensor()), tensor.meta, tensor.applied_operations)
    return copy_in_this_thread(tensor)


class BlockPins:
    """Pin received blocks for :class:`~.transport.PatchPack` to serve views of, at most ``per_worker`` blocks of
    each worker at a time; the ``kept`` most recently pinned ones keep their buffered patches as views.

    Example:
        >>> from monai_patchqueue.data.shared_blocks import close_returns, open_returns
        >>> token, pipes = open_returns(1)
        >>> pins = BlockPins(per_worker=2, kept=1)
        >>> blocks = [torch.zeros(256, dtype=torch.uint8) for _ in range(3)]
        >>> view = pins.pinned(BlockTicket(token, 0, 0), blocks[0], 128)
        >>> view.data_ptr() == blocks[0].data_ptr(), view.numel()
        (True, 128)
        >>> newer = pins.pinned(BlockTicket(token, 0, 1), blocks[1], 128)
        >>> pins.surplus() == [(blocks[0].data_ptr(), blocks[0].data_ptr() + 128)]  # copy its buffered patches out
        True
        >>> pins.pinned(BlockTicket(token, 0, 2), blocks[2], 128) is None  # worker 0's budget is spent
        True
        >>> del view  # the last view of block 0 dies...
        >>> pins.return_released(), pipes[0].get(), pins.surplus()  # ...and the block goes back to worker 0
        (1, 0, [])
        >>> close_returns(token)
    """

    def __init__(self, per_worker: int, kept: int) -> None:
        self.per_worker = per_worker
        self.kept = kept
        self._held: collections.Counter = collections.Counter()  # worker -> blocks pinned and not yet returned
        self._ranges: dict[tuple, tuple[int, int]] = {}  # ticket key -> addresses of its pinned bytes, oldest first
        self._released: queue.SimpleQueue = queue.SimpleQueue()  # its put is reentrant: safe in a finalizer
        self._lock = threading.Lock()  # the server thread reads the ranges while the unpacking thread pins
        self._closed = False
        self.pinned_subjects = 0  # so far: subjects served as views of their block
        self.copied_subjects = 0  # so far: subjects copied out on arrival (their worker's budget was spent)
        self.copied_patches = 0  # so far: buffered patches copied out of surplus blocks (counted by the server)

    def pinned(self, ticket: BlockTicket, block: torch.Tensor, nbytes: int) -> torch.Tensor | None:
        """Return the first ``nbytes`` of ``block`` as a uint8 tensor that pins the block until it and every
        tensor viewing it are gone; None when the budget of the block's worker is spent (copy the patches out).
        """
        with self._lock:
            if self._held[ticket.worker] >= self.per_worker:
                self.copied_subjects += 1
                return None
            self._held[ticket.worker] += 1
            self.pinned_subjects += 1
            self._ranges[ticket.key] = (block.data_ptr(), block.data_ptr() + nbytes)
        array = block.numpy()[:nbytes]  # an array of its own, which the view's storage keeps alive
        finalizer = weakref.finalize(array, self._release, ticket, block)
        finalizer.atexit = False
        return torch.from_numpy(array)

    def _release(self, ticket: BlockTicket, block: torch.Tensor) -> None:
        """Record that the last view of ``block`` is gone (a finalizer: it may run in any thread, at any time)."""
        if not self._closed:
            self._released.put((ticket, block))

    def close(self) -> None:
        """Forget the pinned blocks (their workers are shut down): views that die later release nothing."""
        self._closed = True
        while True:
            try:
                self._released.get_nowait()
            except queue.Empty:
                return

    def surplus(self) -> list[tuple[int, int]]:
        """Return the ``(start, end)`` addresses of the pinned blocks older than the ``kept`` newest (blocks
        whose buffered patches the server copies out), oldest first."""
        with self._lock:
            ranges = list(self._ranges.values())
        return ranges[: max(len(ranges) - self.kept, 0)]

    def return_released(self) -> int:
        """Hand the blocks whose views are all gone back to their workers; return how many."""
        returned = 0
        while True:
            try:
                ticket, block = self._released.get_nowait()
            except queue.Empty:
                return returned
            with self._lock:
                self._held[ticket.worker] -= 1
                del self._ranges[ticket.key]
            return_block(ticket, block)
            returned += 1

    def summary(self) -> str:
        """Say how many subjects were served as views so far, how many copied out, and how many patches the
        server copied out of older blocks.

        Example:
            >>> BlockPins(per_worker=1, kept=1).summary()
            '0 subjects served as views of shared memory, 0 copied out on arrival, 0 buffered patches copied out'
        """
        return (
            f"{self.pinned_subjects} subjects served as views of shared memory, {self.copied_subjects} copied out "
            f"on arrival, {self.copied_patches} buffered patches copied out"
        )

    @property
    def held(self) -> int:
        """Blocks pinned and not yet handed back, of all workers."""
        with self._lock:
            return sum(self._held.values())
