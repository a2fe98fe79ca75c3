"""Random starts: golden placements, properties, chi-square goodness of fit, errors, and TorchIO's maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from monai_patchqueue.sampling import (
    label_classes,
    label_probability_map,
    label_starts,
    uniform_starts,
    weighted_probability_map,
    weighted_starts,
)

P_THRESHOLD = 1e-3  # generous: a correct sampler fails a fixed-seed test with probability 0.1%


def _centre_counts(starts: np.ndarray, spatial_shape, patch_size) -> np.ndarray:
    centres = starts + np.array([p // 2 for p in patch_size])
    counts = np.zeros(spatial_shape, dtype=np.int64)
    np.add.at(counts, tuple(centres.T), 1)
    return counts


def _chi_square_p(counts: np.ndarray, probabilities: np.ndarray) -> float:
    observed = counts.ravel()
    expected = probabilities.ravel() * observed.sum()
    assert observed[expected == 0].sum() == 0, "a centre landed where the probability is zero"
    keep = expected > 0
    return chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue


@pytest.mark.parametrize("patch, centre_index", [(1, 0), (2, 1), (3, 1), (4, 2)])
def test_weighted_centre_placement_golden(patch, centre_index):
    # A single positive voxel at 5 along an axis of 10: the patch starts at 5 - P // 2 and covers it at P // 2.
    weights = torch.zeros(10, 10)
    weights[5, 5] = 1.0
    starts = weighted_starts(weights, (patch, patch), 4, np.random.RandomState(0))
    assert (starts == 5 - centre_index).all()


@pytest.mark.parametrize("patch", [1, 2, 3, 4])
def test_weighted_border_exclusion_golden(patch):
    # Only the first P // 2 and last (P - 1) // 2 voxels cannot be centres.
    low, high = patch // 2, 10 - (patch - 1) // 2
    for position in range(10):
        weights = torch.zeros(10, 1)
        weights[position, 0] = 1.0
        if low <= position < high:
            assert weighted_starts(weights, (patch, 1), 1, np.random.RandomState(0))[0, 0] == position - low
        else:
            with pytest.raises(ValueError, match="no positive value"):
                weighted_starts(weights, (patch, 1), 1, np.random.RandomState(0))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=2, max_size=3), st.integers(0, 2**31))
def test_uniform_starts_in_bounds(sizes, seed):
    shape = [max(n, p) for n, p in sizes]
    patch = [p for _, p in sizes]
    starts = uniform_starts(shape, patch, 20, np.random.RandomState(seed))
    assert starts.shape == (20, len(shape))
    assert (starts >= 0).all() and (starts <= np.array(shape) - np.array(patch)).all()


@settings(max_examples=100, deadline=None)
@given(
    st.tuples(st.integers(3, 12), st.integers(3, 12), st.integers(1, 6)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    st.floats(0.02, 0.9),
    st.integers(0, 2**31),
)
def test_no_centre_on_zero_probability(shape, patch, density, seed):
    patch = tuple(min(p, n) for p, n in zip(patch, shape))
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(shape, generator=generator) * (torch.rand(shape, generator=generator) < density)
    try:
        starts = weighted_starts(weights, patch, 50, np.random.RandomState(seed))
    except ValueError:
        assert _valid_sum(weights, patch) == 0
        return
    centres = starts + np.array([p // 2 for p in patch])
    assert (weights[tuple(torch.from_numpy(centres.T))] > 0).all()
    assert (starts >= 0).all() and (starts + np.array(patch) <= np.array(shape)).all()


def _valid_sum(weights, patch):
    region = tuple(slice(p // 2, n - (p - 1) // 2) for n, p in zip(weights.shape, patch))
    return weights[region].sum().item()


def test_weighted_centres_follow_the_map_chi_square():
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(12, 10, generator=generator) ** 2
    weights[weights < 0.1] = 0
    patch = (4, 3)
    starts = weighted_starts(weights, patch, 40_000, np.random.RandomState(7))
    expected = weighted_probability_map(weights, patch).numpy()
    assert _chi_square_p(_centre_counts(starts, weights.shape, patch), expected) > P_THRESHOLD


def test_weighted_sampler_detects_a_wrong_distribution():
    # The statistical test has power: uniform centres are rejected against a skewed map.
    weights = torch.linspace(0, 1, 100).reshape(10, 10)
    starts = uniform_starts((10, 10), (1, 1), 20_000, np.random.RandomState(0))
    expected = weighted_probability_map(weights, (1, 1)).numpy()
    counts = _centre_counts(starts, (10, 10), (1, 1))
    counts[0, 0] = 0  # voxel 0 has zero probability; uniform put centres there
    assert _chi_square_p(counts, expected) < P_THRESHOLD


@pytest.mark.parametrize("value, message", [(-1.0, "non-negative"), (float("nan"), "NaN"), (float("inf"), "finite")])
def test_weighted_rejects_invalid_values(value, message):
    weights = torch.ones(6, 6)
    weights[0, 0] = value  # even on the border, where no centre can fall
    with pytest.raises(ValueError, match=message):
        weighted_starts(weights, (2, 2), 1, np.random.RandomState(0))


def test_weighted_empty_map_raises_and_suggests_padding():
    weights = torch.zeros(8, 8)
    weights[0, :] = 1.0  # only on the border
    with pytest.raises(ValueError, match=r"pad by half the patch size.*spatial_border=\[2, 2\]"):
        weighted_starts(weights, (4, 4), 1, np.random.RandomState(0), name="probability_key 'w'")


def test_weighted_accepts_integer_and_bool_maps():
    weights = torch.zeros(6, 6, dtype=torch.bool)
    weights[3, 3] = True
    assert weighted_starts(weights, (3, 3), 2, np.random.RandomState(0)).tolist() == [[2, 2], [2, 2]]
    assert weighted_starts(weights.to(torch.uint8), (3, 3), 1, np.random.RandomState(0)).tolist() == [[2, 2]]


def test_label_classes_defaults():
    assert [(c.channel, c.value) for c in label_classes(1, None)] == [(0, None)]
    assert [(c.channel, c.value) for c in label_classes(4, None)] == [(1, None), (2, None), (3, None)]
    with pytest.raises(ValueError, match=r"channels \[5\].*3 channels"):
        label_classes(3, {5: 1.0})


def test_label_class_balance_chi_square():
    # Class 1 is rare (a few voxels) but gets half the centres.
    label = torch.zeros(1, 16, 16, 16)
    label[0, 6:9, 6:9, 6:9] = 1
    label[0, 2:14, 10:14, 2:14] = 2
    classes = label_classes(1, {0: 1, 1: 2, 2: 1})
    starts = label_starts(label, (4, 4, 4), 8_000, np.random.RandomState(3), classes)
    centres = starts + 2
    centre_classes = label[0][tuple(torch.from_numpy(centres.T))].long().numpy()
    observed = np.bincount(centre_classes, minlength=3)
    assert chisquare(observed, np.array([0.25, 0.5, 0.25]) * len(starts)).pvalue > P_THRESHOLD


def test_label_centres_are_uniform_within_a_class_chi_square():
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (1, 9, 8), generator=generator)
    patch = (3, 2)
    classes = label_classes(1, {1: 3, 2: 1})
    starts = label_starts(label, patch, 30_000, np.random.RandomState(5), classes)
    expected = label_probability_map(label, patch, classes).numpy()
    assert _chi_square_p(_centre_counts(starts, (9, 8), patch), expected) > P_THRESHOLD


def test_label_class_balance_on_the_embedded_brain(brain):
    label = brain["label"].as_tensor()
    classes = label_classes(1, {0: 1, 1: 1, 2: 2})
    patch = (16, 16, 16)
    starts = label_starts(label, patch, 4_000, np.random.RandomState(11), classes)
    centre_classes = label[0][tuple(torch.from_numpy((starts + 8).T))].long().numpy()
    observed = np.bincount(centre_classes, minlength=3)
    assert chisquare(observed, np.array([0.25, 0.25, 0.5]) * len(starts)).pvalue > P_THRESHOLD


def test_label_rows_longer_than_a_uint16_counter_are_counted_exactly():
    # Class voxels are counted per row along the last axis in uint16 when rows are short enough; a row of
    # 70,000 voxels must not wrap around (70,000 mod 65,536 would give the second row 0.2% instead of 0.014%).
    label = torch.zeros(1, 2, 70_000, dtype=torch.uint8)
    label[0, 0] = 1
    label[0, 1, :10] = 1
    probabilities = label_probability_map(label, (1, 1), label_classes(1, {1: 1}))
    assert probabilities.sum().item() == pytest.approx(1.0)
    assert probabilities[0, 0].item() == pytest.approx(1 / 70_010)
    starts = label_starts(label, (1, 1), 20_000, np.random.RandomState(0), label_classes(1, {1: 1}))
    assert (starts[:, 0] == 1).sum() < 15  # expected 2.9 draws from the second row (44.6 if it wrapped)


def test_one_hot_default_excludes_channel_zero():
    one_hot = torch.zeros(3, 10, 10)
    one_hot[0] = 1  # background channel everywhere
    one_hot[1, 4, 4] = 1
    one_hot[2, 6, 6] = 1
    starts = label_starts(one_hot, (1, 1), 2_000, np.random.RandomState(0), label_classes(3, None))
    centres = {tuple(s) for s in starts.tolist()}
    assert centres == {(4, 4), (6, 6)}
    share = np.mean([tuple(s) == (4, 4) for s in starts.tolist()])
    assert 0.45 < share < 0.55


def test_absent_class_is_dropped_with_one_warning():
    label = torch.zeros(1, 10, 10)
    label[0, 4:6, 4:6] = 1
    label[0, 0, 0] = 2  # only on the border: absent among valid centres
    classes = label_classes(1, {1: 1, 2: 1, 3: 1})
    with pytest.warns(UserWarning, match=r"classes \[2, 3\]") as record:
        starts = label_starts(label, (3, 3), 10, np.random.RandomState(0), classes)
    assert len(record) == 1
    assert (label[0][tuple(torch.from_numpy((starts + 1).T))] == 1).all()


def test_no_class_present_raises():
    label = torch.zeros(1, 10, 10)
    with pytest.raises(ValueError, match="no positive value"):
        label_starts(label, (3, 3), 1, np.random.RandomState(0), label_classes(1, None))


def _torchio_subject(**images):
    import torchio as tio

    return tio.Subject(**{name: tio.LabelMap(tensor=tensor) for name, tensor in images.items()})


@pytest.mark.parametrize("patch", [(1, 1, 1), (2, 3, 4), (5, 4, 3)])
def test_weighted_map_after_border_exclusion_matches_torchio(patch):
    from torchio.data.sampler.weighted import WeightedSampler as TorchioWeightedSampler

    generator = torch.Generator().manual_seed(2)
    weights = torch.rand(1, 9, 8, 7, generator=generator)
    theirs = TorchioWeightedSampler(patch, "weights").process_probability_map(
        weights, _torchio_subject(weights=weights)
    )
    ours = weighted_probability_map(weights[0], patch).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("patch", [(1, 1, 1), (2, 3, 4), (5, 4, 3)])
@pytest.mark.parametrize("probabilities", [{0: 1, 1: 2, 2: 1}, {1: 1, 2: 3}])
def test_label_map_after_border_exclusion_matches_torchio(patch, probabilities):
    from torchio.data.sampler.label import LabelSampler as TorchioLabelSampler

    generator = torch.Generator().manual_seed(3)
    label = torch.randint(0, 3, (1, 9, 8, 7), generator=generator).float()
    theirs = TorchioLabelSampler.get_probabilities_from_label_map(label, probabilities, np.array(patch))[0]
    theirs = (theirs / theirs.sum()).double().numpy()
    ours = label_probability_map(label, patch, label_classes(1, probabilities)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)
