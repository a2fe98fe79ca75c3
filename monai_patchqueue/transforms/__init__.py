"""Patch samplers as MONAI array and dictionary transforms."""

from .array import GridSampler, LabelSampler, PatchCropper, UniformSampler, WeightedSampler
from .dictionary import GridSamplerd, LabelSamplerd, UniformSamplerd, WeightedSamplerd
from .functional import LOCATION

__all__ = [
    "LOCATION",
    "GridSampler",
    "GridSamplerd",
    "LabelSampler",
    "LabelSamplerd",
    "PatchCropper",
    "UniformSampler",
    "UniformSamplerd",
    "WeightedSampler",
    "WeightedSamplerd",
]
