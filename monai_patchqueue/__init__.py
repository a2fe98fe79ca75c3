"""monai_patchqueue: TorchIO-style patch samplers, patch queue and grid inference, natively in MONAI."""

from .data import PatchQueueDataset, SubjectError
from .data.worker_memory import keep_freed_memory
from .datasets import example_brain
from .inferers import GridAggregator, GridInferer
from .transforms import (
    LOCATION,
    GridSampler,
    GridSamplerd,
    LabelSampler,
    LabelSamplerd,
    LoadMappedNifti,
    LoadMappedNiftid,
    UniformSampler,
    UniformSamplerd,
    WeightedSampler,
    WeightedSamplerd,
)

__version__ = "0.1.0"

__all__ = [
    "LOCATION",
    "GridAggregator",
    "GridInferer",
    "GridSampler",
    "GridSamplerd",
    "LabelSampler",
    "LabelSamplerd",
    "LoadMappedNifti",
    "LoadMappedNiftid",
    "PatchQueueDataset",
    "SubjectError",
    "UniformSampler",
    "UniformSamplerd",
    "WeightedSampler",
    "WeightedSamplerd",
    "__version__",
    "example_brain",
    "keep_freed_memory",
]
