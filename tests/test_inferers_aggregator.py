"""GridAggregator: identity round trips in every mode, TorchIO equality, downsampled outputs, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from monai_patchqueue import GridAggregator, GridSamplerd
from monai_patchqueue.inferers.aggregator import hann_window

MODES = ["crop", "average", "hann", "gaussian"]


def _aggregate(image, patch, overlap, mode, padding_mode=None, network=lambda x: x, batch=3):
    patches = GridSamplerd("image", patch, patch_overlap=overlap, padding_mode=padding_mode)({"image": image})
    aggregator = GridAggregator(image.shape[1:], patch, overlap, overlap_mode=mode, padding_mode=padding_mode)
    for start in range(0, len(patches), batch):
        chunk = patches[start : start + batch]
        aggregator.add_batch(network(torch.stack([p["image"].as_tensor() for p in chunk])),
                             torch.stack([p["location"] for p in chunk]))  # fmt: skip
    return aggregator.get_output_tensor()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(4, 14), st.integers(2, 7), st.integers(0, 3)), min_size=2, max_size=3),
    st.sampled_from(MODES),
    st.sampled_from([None, "constant", "reflect"]),
)
def test_aggregating_the_grid_split_gives_the_image_back(case, mode, padding_mode):
    shape = [max(n, p) for n, p, _ in case]
    patch = [p for _, p, _ in case]
    overlap = [min(2 * o, 2 * ((p - 1) // 2)) for _, p, o in case]
    image = torch.rand(2, *shape)
    output = _aggregate(image, patch, overlap, mode, padding_mode)
    assert tuple(output.shape) == tuple(image.shape)
    torch.testing.assert_close(output, image, rtol=1e-5, atol=1e-5)


def test_hann_window_is_positive_and_matches_the_definition():
    window = hann_window((5, 4))
    assert (window > 0).all()
    expected = np.outer(np.sin(np.pi * np.arange(1, 6) / 6) ** 2, np.sin(np.pi * np.arange(1, 5) / 5) ** 2)
    np.testing.assert_allclose(window.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["crop", "average", "hann"])
@pytest.mark.parametrize("padding_mode", [None, "constant"])
def test_equals_torchio_grid_sampler_and_aggregator(mode, padding_mode):
    import torchio as tio

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 21, 17, 13, generator=generator)
    patch, overlap = (8, 6, 6), (4, 2, 2)

    def network(x):  # a non-trivial, position-dependent "network": different patches disagree in overlaps
        return torch.stack([x[:, 0] * 2 + x[:, 0].mean(dim=(1, 2, 3), keepdim=True), x[:, 0] ** 2], dim=1)

    subject = tio.Subject(image=tio.ScalarImage(tensor=image))
    sampler = tio.GridSampler(subject, patch_size=patch, patch_overlap=overlap, padding_mode=padding_mode)
    aggregator = tio.GridAggregator(sampler, overlap_mode=mode)
    for batch in torch.utils.data.DataLoader(sampler, batch_size=4):
        aggregator.add_batch(network(batch["image"][tio.DATA]), batch[tio.LOCATION])
    theirs = aggregator.get_output_tensor()
    ours = _aggregate(image, patch, overlap, mode, padding_mode, network=network, batch=4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_downsampled_outputs_are_aggregated_at_their_resolution(mode):
    image = torch.rand(1, 24, 16, 20)
    pool = torch.nn.AvgPool3d((2, 2, 1))
    output = _aggregate(image, (8, 8, 8), (4, 4, 4), mode, network=pool)
    assert tuple(output.shape) == (1, 12, 8, 20)
    torch.testing.assert_close(output, pool(image[None])[0], rtol=1e-5, atol=1e-5)


def test_integer_outputs_in_crop_mode_keep_their_dtype():
    image = torch.randint(0, 5, (1, 10, 10, 10))
    output = _aggregate(image, 6, 2, "crop")
    assert output.dtype == image.dtype
    torch.testing.assert_close(output, image)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_outputs_blend_in_float32_and_round_trip(mode, dtype):
    image = torch.rand(1, 20, 18, 16) * 10
    output = _aggregate(image, 8, 4, mode, network=lambda x: x.to(dtype))
    assert output.dtype == (dtype if mode == "crop" else torch.float32)  # weighted sums in half precision round
    torch.testing.assert_close(output.float(), image.to(dtype).float(), rtol=1e-6, atol=1e-6)


def test_an_explicit_dtype_is_kept_in_weighted_modes():
    aggregator = GridAggregator((8, 8, 8), 4, 2, overlap_mode="hann", dtype=torch.bfloat16)
    aggregator.add_batch(torch.ones(1, 1, 4, 4, 4, dtype=torch.bfloat16), torch.tensor([[0, 0, 0, 4, 4, 4]]))
    assert aggregator._output.dtype == torch.bfloat16


def test_weight_buffer_has_one_channel():
    aggregator = GridAggregator((8, 8, 8), 4, 2, overlap_mode="hann")
    aggregator.add_batch(torch.ones(1, 5, 4, 4, 4), torch.tensor([[0, 0, 0, 4, 4, 4]]))
    assert aggregator._weights.shape == (1, 8, 8, 8) and aggregator._output.shape == (5, 8, 8, 8)


@pytest.mark.parametrize("overlap_mode", ["crop", "hann"])
def test_output_is_normalised_in_place_once_and_reset_starts_afresh(overlap_mode):
    patches = GridSamplerd("image", 4, patch_overlap=2)({"image": torch.rand(2, 8, 8)})
    outputs, locations = torch.stack([p["image"] for p in patches]), torch.stack([p["location"] for p in patches])
    aggregator = GridAggregator((8, 8), 4, 2, overlap_mode=overlap_mode)
    aggregator.add_batch(outputs, locations)
    first = aggregator.get_output_tensor()
    assert first.data_ptr() == aggregator._output.data_ptr()  # a view of the buffer, not a second volume
    assert aggregator._weights is None  # the weight buffer is freed once used
    torch.testing.assert_close(aggregator.get_output_tensor(), first)  # a second call does not divide again
    with pytest.raises(RuntimeError, match="call reset"):
        aggregator.add_batch(outputs, locations)
    aggregator.reset()
    aggregator.add_batch(2 * outputs, locations)
    torch.testing.assert_close(aggregator.get_output_tensor(), 2 * first)


def test_missing_patches_raise_instead_of_leaving_holes():
    aggregator = GridAggregator((8, 8), 4, overlap_mode="average")
    aggregator.add_batch(torch.ones(1, 1, 4, 4), torch.tensor([[0, 0, 4, 4]]))
    with pytest.raises(RuntimeError, match="4 patches but 1 were added"):
        aggregator.get_output_tensor()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patch_overlap": 3}, "even"),
        ({"patch_overlap": 8}, "smaller"),
        ({"patch_size": 20}, r"\(20, 20, 20\) exceeds the spatial shape \(16, 16, 16\) of the input"),
        ({"overlap_mode": "max"}, "overlap_mode"),
        ({"padding_mode": "bogus"}, "padding_mode"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, message):
    arguments = {"spatial_shape": (16, 16, 16), "patch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        GridAggregator(**arguments)


def test_output_that_is_not_an_integer_fraction_raises_naming_shapes():
    aggregator = GridAggregator((16, 16, 16), 8, 4)
    with pytest.raises(ValueError, match=r"output patch \(3, 8, 8\) should be the patch \(8, 8, 8\) divided"):
        aggregator.add_batch(torch.zeros(1, 1, 3, 8, 8), torch.tensor([[0, 0, 0, 8, 8, 8]]))


@pytest.mark.parametrize("mode", MODES)
def test_metatensor_network_outputs_are_accepted(mode):
    image = torch.rand(1, 8, 8)
    output = _aggregate(image, 4, 2, mode, network=lambda x: MetaTensor(x))
    torch.testing.assert_close(torch.as_tensor(output), image)
