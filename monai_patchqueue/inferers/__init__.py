"""Grid inference: aggregation of patch outputs and a MONAI Inferer."""

from .aggregator import GridAggregator
from .grid import GridInferer

__all__ = ["GridAggregator", "GridInferer"]
