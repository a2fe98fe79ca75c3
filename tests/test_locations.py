"""Patch geometry: golden tables, properties, and TorchIO's grid locations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monai_patchqueue.locations import grid_locations, grid_starts, patch_locations, valid_centre_bounds


@pytest.mark.parametrize(
    "size, patch, overlap, starts",
    [(10, 5, 2, [0, 3, 5]), (10, 5, 0, [0, 5]), (10, 10, 0, [0]), (7, 3, 0, [0, 3, 4]), (9, 4, 2, [0, 2, 4, 5])],
)
def test_grid_starts_golden(size, patch, overlap, starts):
    assert grid_starts(size, patch, overlap) == starts


@pytest.mark.parametrize("size, patch, low, high", [(10, 1, 0, 10), (10, 2, 1, 10), (10, 3, 1, 9), (10, 4, 2, 9)])
def test_valid_centre_bounds_golden(size, patch, low, high):
    assert valid_centre_bounds((size,), (patch,)) == ((low,), (high,))


def test_patch_locations_are_starts_then_ends():
    locations = patch_locations(np.array([[1, 2], [3, 4]]), (5, 6))
    np.testing.assert_array_equal(locations, [[1, 2, 6, 8], [3, 4, 8, 10]])
    assert locations.dtype == np.int64


grid_case = st.integers(2, 3).flatmap(
    lambda ndim: st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(0, 20)), min_size=ndim, max_size=ndim
    )
)


def _valid(case):
    shape = [max(n, p) for n, p, _ in case]
    patch = [p for _, p, _ in case]
    overlap = [min(2 * (o // 2), 2 * ((p - 1) // 2)) for _, p, o in case]
    return shape, patch, overlap


@settings(max_examples=150, deadline=None)
@given(grid_case)
def test_grid_covers_every_voxel_with_patches_in_bounds(case):
    shape, patch, overlap = _valid(case)
    locations = grid_locations(shape, patch, overlap)
    ndim = len(shape)
    assert (locations[:, :ndim] >= 0).all()
    assert (locations[:, ndim:] <= np.array(shape)).all()
    np.testing.assert_array_equal(locations[:, ndim:] - locations[:, :ndim], np.tile(patch, (len(locations), 1)))
    covered = np.zeros(shape, dtype=bool)
    for location in locations:
        covered[tuple(slice(s, e) for s, e in zip(location[:ndim], location[ndim:]))] = True
    assert covered.all()
    assert [tuple(row) for row in locations] == sorted(tuple(row) for row in locations)
    assert len({tuple(row) for row in locations}) == len(locations)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(0, 20)), min_size=3, max_size=3))
def test_grid_locations_match_torchio(case):
    from torchio.data.sampler.grid import GridSampler as TorchioGridSampler

    shape, patch, overlap = _valid(case)
    ours = grid_locations(shape, patch, overlap)
    theirs = TorchioGridSampler._get_patches_locations(tuple(shape), tuple(patch), tuple(overlap))
    np.testing.assert_array_equal(ours, theirs)
