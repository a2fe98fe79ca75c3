"""One epoch's patch stream: subjects admitted into the buffer as room appears, patches popped into slabs.

The order is a pure function of the plan and the seed: a subject's patches enter the buffer as soon as there
is room for all of them (or the buffer is empty), and each pop draws uniformly from what the buffer holds
(first in, first out without shuffling). Whoever runs :meth:`EpochServer.slabs` (the training thread without
workers, the receiver thread with them) gets the same stream; grouping the pops into slabs does not change it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

from .block_pins import BlockPins, copied_out_of
from .buffer import PatchBuffer
from .planner import EpochPlanner
from .schedule import SubjectTask, epoch_generator
from .slabs import CollationProbe, PatchSlab, ServedPatch
from .subject_patches import SubjectError, describe_subject

__all__ = ["SLAB_PATCHES", "EpochServer", "slab_capacity"]

logger = logging.getLogger("monai_patchqueue.data.queue")

SLAB_PATCHES = 16
"""Patches per slab (fewer when ``max_length`` is smaller): batches of 1, 2, 4, 8 or 16 are slices of one."""

_BUFFER_STREAM = 3

_PROBE_WINDOW_SLABS = 4
"""Slabs' worth of patches taken without a batch collated from a slab before the server stops laying them out."""

_PROBE_EVERY = 16
"""After that, one chunk in this many is a slab, to notice a consumer that starts collating from them."""


def slab_capacity(max_length: int) -> int:
    """Return the patches per slab for a buffer of ``max_length`` patches.

    Example:
        >>> slab_capacity(64), slab_capacity(4)
        (16, 4)
    """
    return min(SLAB_PATCHES, max_length)


class PatchChunk(list):
    """Popped patches served as they are, when batches are not collated from slabs (see :class:`CollationProbe`).

    Example:
        >>> chunk = PatchChunk(2)
        >>> chunk.add({"x": 0}); chunk.full, len(chunk.served())
        (False, 1)
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def add(self, patch: dict) -> None:
        self.append(patch)

    @property
    def full(self) -> bool:
        return len(self) == self.capacity

    def served(self) -> list[dict]:
        """Hand the patches over, leaving the chunk empty (as :meth:`PatchSlab.served` leaves its slab)."""
        patches = list(self)
        self.clear()
        return patches


class EpochServer:
    """Turn the subject results of an epoch into its patches, in slabs of :func:`slab_capacity` patches.

    Patches are laid out in slabs (:class:`PatchSlab`) while the consumer collates its batches from them, as
    torch's ``default_collate`` does, and otherwise served as they are (:class:`PatchChunk`): ``probe`` decides
    chunk by chunk. Either way the stream is the same.

    Args:
        data: the queue's data, to name a failing subject.
        planner: the epoch plans.
        seed: the queue's seed (the buffer's draws are seeded per epoch and rank).
        max_length: most patches in the buffer.
        shuffle_patches: pop at random; False pops first in, first out.
        verbose: log every admission at INFO level.
        pins: the pinned blocks whose patches were received as views (see :mod:`.block_pins`): after each
            admission, the buffered patches of blocks beyond the most recent ones are copied out, so that those
            blocks go back to their workers.

    Example:
        >>> import torch
        >>> planner = EpochPlanner([2, 2], seed=0, shuffle_subjects=False)
        >>> results = iter([(task, [{"x": torch.tensor(i)}] * 2) for i, task in enumerate(planner.tasks(0))])
        >>> server = EpochServer(None, planner, seed=0, max_length=4, shuffle_patches=False)
        >>> [[int(patch["x"]) for patch in slab] for slab in server.slabs(0, results)]
        [[0, 0, 1, 1]]
    """

    def __init__(
        self,
        data: Any,
        planner: EpochPlanner,
        seed: int,
        max_length: int,
        shuffle_patches: bool,
        verbose: bool = False,
        pins: BlockPins | None = None,
    ) -> None:
        self.data = data
        self.planner = planner
        self.seed = seed
        self.max_length = max_length
        self.shuffle_patches = shuffle_patches
        self.verbose = verbose
        self.pins = pins
        self.buffered = 0  # patches in the buffer after the last pop, for the queue's repr
        self.capacity = slab_capacity(max_length)
        self.probe = CollationProbe(window=_PROBE_WINDOW_SLABS * self.capacity, probe_every=_PROBE_EVERY)

    def slabs(self, epoch: int, results: Iterator) -> Iterator[list[ServedPatch] | list[dict]]:
        """Yield the patches of ``epoch``, a slab at a time, pulling its tasks' ``(task, patches)`` from
        ``results`` as the buffer admits them (exactly as many as the epoch has tasks).

        A failure while a slab fills comes after the patches popped before it; an interruption (e.g.
        ``KeyboardInterrupt``, or the consumer closing the epoch) ends the epoch at once.
        """
        tasks = self.planner.tasks(epoch)
        rank, _ = self.planner.rank_and_size()
        rng = epoch_generator(self.seed, epoch, rank, stream=_BUFFER_STREAM) if self.shuffle_patches else None
        buffer = PatchBuffer(rng)
        self.probe.new_epoch()
        admitted, total = 0, sum(task.count for task in tasks)
        slab = self._chunk(min(self.capacity, total))
        try:
            for served in range(total):
                while admitted < len(tasks) and (
                    len(buffer) + tasks[admitted].count <= self.max_length or not len(buffer)
                ):
                    buffer.extend(self._next_result(results, tasks[admitted]))
                    admitted += 1
                    self._log(epoch, tasks[admitted - 1], len(buffer))
                    self._copy_out_surplus(buffer)
                slab.add(buffer.pop())
                self.buffered = len(buffer)
                if slab.full:
                    yield slab.served()
                    slab = self._chunk(min(self.capacity, total - served - 1))
        except Exception:
            if len(slab):
                yield slab.served()
            raise

    def _copy_out_surplus(self, buffer: PatchBuffer) -> None:
        surplus = self.pins.surplus() if self.pins is not None else []
        if surplus:
            self.pins.copied_patches += buffer.replace(partial(copied_out_of, ranges=surplus))

    def _chunk(self, capacity: int) -> PatchSlab | PatchChunk:
        return PatchSlab(capacity, self.probe) if self.probe.wants_slab() else PatchChunk(capacity)

    def _next_result(self, results: Iterator, task: SubjectTask) -> list[dict]:
        try:
            done, patches = next(results)
        except SubjectError:
            raise
        except Exception as error:
            subject = describe_subject(self.data, task.subject)
            raise RuntimeError(
                f"PatchQueueDataset's background work failed while preparing {subject}: {type(error).__name__}: {error}"
            ) from error
        if (done.epoch, done.position) != (task.epoch, task.position):
            raise RuntimeError(f"PatchQueueDataset received task {done} while expecting {task}; please report this")
        if len(patches) != task.count:
            raise RuntimeError(
                f"{describe_subject(self.data, task.subject)} gave {len(patches)} patches, not {task.count}"
            )
        return patches

    def _log(self, epoch: int, task: SubjectTask, buffered: int) -> None:
        if self.verbose:
            logger.info("epoch %d: subject %d gave %d patches (%d buffered)", epoch, task.subject, task.count, buffered)
