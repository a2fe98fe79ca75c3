"""Pure epoch planning for the patch queue: which subjects, in which order, how many patches, which seeds.

Everything here is a function of ``(seed, epoch, rank)`` and the subject counts, never of timing or of the
number of worker processes: that is what makes the queue's patch stream reproducible with any ``num_workers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "SubjectTask",
    "epoch_generator",
    "epoch_tasks",
    "equalised_counts",
    "rank_shares",
    "subject_order",
]

_SEED_BITS = 32


class SubjectTask(NamedTuple):
    """One unit of background work: prepare subject ``subject`` and cut ``count`` patches from it.

    ``position`` is the task's place in its rank's epoch plan and ``seed`` seeds every random transform that
    touches the subject, so the result does not depend on which worker runs it.
    """

    epoch: int
    position: int
    subject: int
    count: int
    seed: int


def epoch_generator(seed: int, epoch: int, rank: int, stream: int) -> np.random.Generator:
    """Return the generator of one random stream of ``(seed, epoch, rank)``.

    Example:
        >>> a = epoch_generator(0, 1, 0, stream=0).integers(1000)
        >>> b = epoch_generator(0, 1, 0, stream=0).integers(1000)
        >>> bool(a == b)
        True
    """
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, stream]))


def subject_order(num_subjects: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Return the global subject order of ``epoch``: a seeded permutation, or ``range`` without shuffling.

    Example:
        >>> subject_order(4, seed=0, epoch=0, shuffle=False)
        [0, 1, 2, 3]
        >>> sorted(subject_order(4, seed=0, epoch=0, shuffle=True))
        [0, 1, 2, 3]
    """
    if not shuffle:
        return list(range(num_subjects))
    return [int(i) for i in epoch_generator(seed, epoch, 0, stream=0).permutation(num_subjects)]


def rank_shares(order: Sequence[int], world_size: int) -> list[list[int]]:
    """Split ``order`` into ``world_size`` disjoint shares: rank ``r`` takes positions ``r, r + world_size, ...``.

    Shares differ in size by at most one subject; :func:`equalised_counts` then evens out the patch counts, so
    no subject is duplicated to pad a share (as ``DistributedSampler`` does).

    Example:
        >>> rank_shares([5, 6, 7], 2)
        [[5, 7], [6]]
    """
    if len(order) < world_size:
        raise ValueError(
            f"there are {len(order)} subjects for {world_size} ranks; each rank needs at least one subject"
        )
    return [list(order[rank::world_size]) for rank in range(world_size)]


def equalised_counts(counts: Sequence[int], target: int) -> list[int]:
    """Add patches one at a time round-robin over ``counts`` until they sum to ``target``.

    Used so that every rank yields the same number of patches (the rank with the largest share sets the
    target); a rank whose counts already reach ``target`` is left alone.

    Example:
        >>> equalised_counts([4, 4, 2], 13)
        [5, 5, 3]
    """
    out = list(counts)
    missing = target - sum(out)
    if missing > 0 and not out:
        raise ValueError(f"a rank with no subjects cannot yield the {target} patches the other ranks yield")
    for i in range(max(missing, 0)):
        out[i % len(out)] += 1
    return out


def epoch_tasks(subjects: Sequence[int], counts: Sequence[int], seed: int, epoch: int, rank: int) -> list[SubjectTask]:
    """Return the tasks of one rank's epoch, each with its own seed drawn from ``(seed, epoch, rank)``.

    Example:
        >>> [(t.subject, t.count) for t in epoch_tasks([2, 0], [3, 1], seed=0, epoch=0, rank=0)]
        [(2, 3), (0, 1)]
    """
    seeds = epoch_generator(seed, epoch, rank, stream=1).integers(0, 2**_SEED_BITS, size=len(subjects))
    return [
        SubjectTask(epoch, position, int(subject), int(count), int(task_seed))
        for position, (subject, count, task_seed) in enumerate(zip(subjects, counts, seeds))
    ]
