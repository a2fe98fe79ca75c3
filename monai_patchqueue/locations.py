"""Patch geometry: starts and ends, grid locations and the bounds of valid patch centres.

Everything here is pure: shapes and ints in, NumPy int64 arrays out.

A *location* is one row ``[i0, j0, k0, i1, j1, k1]`` (``[i0, j0, i1, j1]`` in 2D): the start indices of a
patch followed by its exclusive end indices.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["grid_locations", "grid_starts", "patch_locations", "valid_centre_bounds"]


def patch_locations(starts: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """Return the locations (starts then exclusive ends) of patches with the given starts.

    Args:
        starts: ``(K, n)`` start indices.
        patch_size: ``n`` ints.

    Example:
        >>> patch_locations(np.array([[0, 1, 2]]), (4, 4, 4))
        array([[0, 1, 2, 4, 5, 6]])
    """
    starts = np.asarray(starts, dtype=np.int64).reshape(-1, len(patch_size))
    return np.concatenate([starts, starts + np.asarray(patch_size, dtype=np.int64)], axis=1)


def valid_centre_bounds(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Return the ``(low, high)`` bounds (``high`` exclusive) of the voxels that can be a patch centre.

    The centre of a patch of size ``P`` starting at ``s`` is ``s + P // 2`` (for even ``P``, the voxel after
    the midpoint), so the first ``P // 2`` and the last ``(P - 1) // 2`` voxels of each axis are excluded.

    Example:
        >>> valid_centre_bounds((10, 10), (4, 3))
        ((2, 1), (9, 9))
    """
    low = tuple(p // 2 for p in patch_size)
    high = tuple(n - (p - 1) // 2 for n, p in zip(spatial_shape, patch_size))
    return low, high


def grid_starts(size: int, patch: int, overlap: int) -> list[int]:
    """Return the start indices of a grid along one axis.

    Starts are ``range(0, size - patch + 1, patch - overlap)`` plus ``size - patch`` if it is missing,
    so that the last patch ends at the border.

    Example:
        >>> grid_starts(10, 5, 2)
        [0, 3, 5]
    """
    starts = list(range(0, size - patch + 1, patch - overlap))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def grid_locations(spatial_shape: Sequence[int], patch_size: Sequence[int], patch_overlap: Sequence[int]) -> np.ndarray:
    """Return the locations of a grid of patches covering the whole image, in lexicographic order.

    Args:
        spatial_shape: ``n`` ints, the image size.
        patch_size: ``n`` ints, each at most the image size.
        patch_overlap: ``n`` ints, each smaller than the patch.

    Example:
        >>> grid_locations((10, 4), (5, 4), (2, 0))
        array([[ 0,  0,  5,  4],
               [ 3,  0,  8,  4],
               [ 5,  0, 10,  4]])
    """
    per_axis = [grid_starts(n, p, o) for n, p, o in zip(spatial_shape, patch_size, patch_overlap)]
    starts = np.array(list(itertools.product(*per_axis)), dtype=np.int64)
    return patch_locations(starts, patch_size)
