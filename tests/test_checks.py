"""Argument validators: what they accept, and errors that name the argument and the value."""

from __future__ import annotations

import numpy as np
import pytest

from monai_patchqueue._checks import (
    check_label_probabilities,
    check_patch_fits,
    check_patch_overlap,
    check_positive_int,
    expand_to_spatial_dims,
    spatial_sizes,
)


@pytest.mark.parametrize("value, expected", [(8, (8,)), ((4, 5), (4, 5)), ([1, 2, 3], (1, 2, 3)),
                                             (np.array([2, 3, 4]), (2, 3, 4)), (np.int64(7), (7,))])  # fmt: skip
def test_spatial_sizes_normalises_to_python_ints(value, expected):
    result = spatial_sizes(value, "patch_size")
    assert result == expected
    assert all(type(v) is int for v in result)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (0, ValueError, r"patch_size=\[0\]"),
        ((8, -1, 8), ValueError, r"patch_size=\[8, -1, 8\]"),
        (2.5, TypeError, r"patch_size=2.5"),
        ((8, 8.0, 8), TypeError, r"integers only"),
        ("64", TypeError, r"patch_size='64'"),
        (True, TypeError, r"patch_size=True"),
        ((8, 8, 8, 8), ValueError, r"4 values"),
    ],
)
def test_spatial_sizes_rejects_bad_values_naming_them(value, error, message):
    with pytest.raises(error, match=message):
        spatial_sizes(value, "patch_size")


def test_overlap_may_be_zero_but_not_negative():
    assert spatial_sizes(0, "patch_overlap", minimum=0) == (0,)
    with pytest.raises(ValueError, match=r"at least 0, but got patch_overlap=\[-2\]"):
        spatial_sizes(-2, "patch_overlap", minimum=0)


def test_expand_broadcasts_and_checks_dims():
    assert expand_to_spatial_dims((3,), 2, "patch_size") == (3, 3)
    with pytest.raises(ValueError, match=r"`patch_size` \(3, 3, 3\) has 3 values but the image has 2"):
        expand_to_spatial_dims((3, 3, 3), 2, "patch_size")


@pytest.mark.parametrize("value", [0, -3])
def test_positive_int_names_value(value):
    with pytest.raises(ValueError, match=rf"num_samples={value}"):
        check_positive_int(value, "num_samples")
    with pytest.raises(TypeError, match=r"num_samples=1\.0"):
        check_positive_int(1.0, "num_samples")


def test_patch_fits_suggests_padding():
    check_patch_fits((4, 4), (4, 5), "key 'image'")
    with pytest.raises(
        ValueError, match=r"\(96, 96, 96\) exceeds the spatial shape \(80, 96, 96\) of key 'image'.*pad"
    ):
        check_patch_fits((96, 96, 96), (80, 96, 96), "key 'image'")


@pytest.mark.parametrize("overlap, message", [((3, 2), "even"), ((4, 4), "smaller")])
def test_overlap_must_be_even_and_smaller(overlap, message):
    with pytest.raises(ValueError, match=message):
        check_patch_overlap(overlap, (4, 8))


def test_label_probabilities_accept_json_keys():
    assert check_label_probabilities({"0": 0, "1": 2, 2: 1.5}) == {0: 0.0, 1: 2.0, 2: 1.5}
    assert check_label_probabilities(None) is None


@pytest.mark.parametrize(
    "value, error, message",
    [
        ({"one": 1}, ValueError, "key 'one'"),
        ({1.5: 1}, ValueError, "key 1.5"),
        ({1: -1}, ValueError, "1: -1"),
        ({1: float("nan")}, ValueError, "1: nan"),
        ({0: 0, 1: 0}, ValueError, "at least one positive"),
        ({1: 1, "1": 2}, ValueError, "twice"),
        ([0.5, 0.5], TypeError, "mapping"),
        ({}, TypeError, "non-empty"),
    ],
)
def test_label_probabilities_reject_bad_entries(value, error, message):
    with pytest.raises(error, match=message):
        check_label_probabilities(value)
