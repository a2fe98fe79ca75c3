"""Patch samplers as MONAI array and dictionary transforms, and a memory-mapped NIfTI loader."""

from .array import GridSampler, LabelSampler, PatchCropper, UniformSampler, WeightedSampler
from .dictionary import GridSamplerd, LabelSamplerd, UniformSamplerd, WeightedSamplerd
from .functional import LOCATION
from .loading import LoadMappedNifti, LoadMappedNiftid

__all__ = [
    "LOCATION",
    "GridSampler",
    "GridSamplerd",
    "LabelSampler",
    "LabelSamplerd",
    "LoadMappedNifti",
    "LoadMappedNiftid",
    "PatchCropper",
    "UniformSampler",
    "UniformSamplerd",
    "WeightedSampler",
    "WeightedSamplerd",
]
