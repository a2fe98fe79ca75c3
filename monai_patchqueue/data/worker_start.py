"""Start the queue's worker processes with the training process's settings, however they were started.

A worker started by fork (Linux up to Python 3.13) inherits the training process's global settings; one started
by spawn or forkserver (macOS, Windows, and Linux from Python 3.14, or after
``torch.multiprocessing.set_start_method``) imports MONAI and torch afresh and gets their defaults. A training
script's ``monai.data.set_track_meta(False)`` then did not reach such workers: their patches were MetaTensors,
and the same queue served plain tensors without workers. :class:`WorkerStart`, the queue's ``worker_init_fn``,
carries the settings that change what transforms return (MONAI's metadata tracking and torch's default dtype),
read in the training process when the workers start, into every worker, then prepares its memory
(:func:`.worker_memory.start_worker`). A setting changed after the workers started reaches them only when they
are started again (a new queue, or ``set_random_state``), as with fork.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.data.meta_obj import get_track_meta, set_track_meta

from .worker_memory import start_worker

__all__ = ["WorkerStart"]


@dataclass(frozen=True)
class WorkerStart:
    """A ``worker_init_fn`` that applies these settings in the worker, then calls :func:`.start_worker`.

    Args:
        track_meta: MONAI's metadata tracking (``set_track_meta``): whether transforms return MetaTensors.
        default_dtype: torch's default floating-point dtype (``torch.set_default_dtype``).

    Example:
        >>> from torch.utils.data import DataLoader
        >>> start = WorkerStart.of_this_process()
        >>> start.track_meta, start.default_dtype
        (True, torch.float32)
        >>> loader = DataLoader(range(4), num_workers=2, worker_init_fn=start)
    """

    track_meta: bool
    default_dtype: torch.dtype

    @classmethod
    def of_this_process(cls) -> WorkerStart:
        """Return the settings of the calling process (the training process, when the queue starts its workers)."""
        return cls(track_meta=get_track_meta(), default_dtype=torch.get_default_dtype())

    def __call__(self, worker_id: int | None = None) -> None:
        """Apply the settings in this (worker) process and prepare its memory; ``worker_id`` is ignored."""
        set_track_meta(self.track_meta)
        torch.set_default_dtype(self.default_dtype)
        start_worker(worker_id)
