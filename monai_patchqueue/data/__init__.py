"""The patch queue: background preparation of subjects and a shuffled buffer of their patches."""

from .queue import EpochStatistics, PatchQueueDataset
from .subject_patches import SubjectError

__all__ = ["EpochStatistics", "PatchQueueDataset", "SubjectError"]
