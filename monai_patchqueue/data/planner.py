"""Each rank's epoch plan: its share of the subjects, their order, their patch counts and seeds."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch.distributed as dist

from .schedule import SubjectTask, epoch_generator, epoch_tasks, equalised_counts, rank_shares, subject_order

__all__ = ["EpochPlanner"]


def _distributed_rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochPlanner:
    """Plan the subject tasks of one rank for any epoch, the same on every rank and with any worker count.

    Without ``subject_sampler`` the subjects are shuffled with ``seed`` (if ``shuffle_subjects``) and, when
    ``torch.distributed`` is initialised, split between ranks as ``DistributedSampler`` splits them. With a
    ``subject_sampler`` its indices (after ``set_epoch``) are this rank's share; a sampler with ``rank`` and
    ``num_replicas`` attributes (``DistributedSampler``) is also asked for the other ranks' shares. Ranks whose
    share holds fewer patches get extra patches, round-robin over their subjects, so that every rank yields the
    same number (otherwise a collective operation in the training loop would hang).

    Args:
        counts: patches per subject, indexed like the data.
        seed: the queue's seed.
        shuffle_subjects: reorder the subjects every epoch.
        subject_sampler: optional iterable of subject indices, e.g. a ``DistributedSampler``.

    Example:
        >>> planner = EpochPlanner([2, 2, 3], seed=0, shuffle_subjects=False)
        >>> [(task.subject, task.count) for task in planner.tasks(epoch=0)]
        [(0, 2), (1, 2), (2, 3)]
    """

    def __init__(
        self,
        counts: Sequence[int],
        seed: int,
        shuffle_subjects: bool,
        subject_sampler: Iterable[int] | None = None,
    ) -> None:
        self.counts = list(counts)
        self.seed = seed
        self.shuffle_subjects = shuffle_subjects
        self.subject_sampler = subject_sampler
        self._cache: dict[tuple[int, int, int], list[SubjectTask]] = {}

    def rank_and_size(self) -> tuple[int, int]:
        """Return this process's rank and the number of ranks the subjects are split between."""
        sampler = self.subject_sampler
        if sampler is None:
            return _distributed_rank_and_size()
        if hasattr(sampler, "rank") and hasattr(sampler, "num_replicas"):
            return int(sampler.rank), int(sampler.num_replicas)
        return 0, 1

    def tasks(self, epoch: int) -> list[SubjectTask]:
        """Return this rank's tasks for ``epoch`` (cached for the last few epochs)."""
        rank, size = self.rank_and_size()
        key = (epoch, rank, size)
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._plan(epoch, rank, size)
        return self._cache[key]

    def _plan(self, epoch: int, rank: int, size: int) -> list[SubjectTask]:
        shares = self._shares(epoch, rank, size)
        for share in shares:
            for subject in share:
                if not 0 <= subject < len(self.counts):
                    raise IndexError(
                        f"`subject_sampler` gave subject index {subject} but there are {len(self.counts)} subjects"
                    )
        mine = shares[rank]
        if self.subject_sampler is not None and self.shuffle_subjects:
            mine = [mine[i] for i in epoch_generator(self.seed, epoch, rank, stream=2).permutation(len(mine))]
        target = max(sum(self.counts[s] for s in share) for share in shares)
        counts = equalised_counts([self.counts[s] for s in mine], target)
        return epoch_tasks(mine, counts, self.seed, epoch, rank)

    def _shares(self, epoch: int, rank: int, size: int) -> list[list[int]]:
        sampler = self.subject_sampler
        if sampler is None:
            return rank_shares(subject_order(len(self.counts), self.seed, epoch, self.shuffle_subjects), size)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if size == 1 or not hasattr(sampler, "rank"):
            return [[int(i) for i in sampler]]
        return [[int(i) for i in _for_rank(sampler, other)] for other in range(size)]


def _for_rank(sampler: Any, rank: int) -> Any:
    other = copy.copy(sampler)
    other.rank = rank
    return other
