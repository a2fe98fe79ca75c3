"""Array samplers: patches, affines in world coordinates, copies, inverse, determinism, errors, 2D."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialCrop

from monai_patchqueue import GridSampler, LabelSampler, UniformSampler, WeightedSampler


def _samplers(patch_size, num_samples=4):
    return {
        "uniform": (UniformSampler(patch_size, num_samples=num_samples), lambda v: ()),
        "weighted": (WeightedSampler(patch_size, num_samples=num_samples), lambda v: (v["image"],)),
        "label": (LabelSampler(patch_size, num_samples=num_samples), lambda v: (v["label"],)),
        "grid": (GridSampler(patch_size, patch_overlap=2), lambda v: ()),
    }


def _region(location):
    half = len(location) // 2
    return (slice(None), *tuple(slice(int(s), int(e)) for s, e in zip(location[:half], location[half:])))


@pytest.mark.parametrize("name", ["uniform", "weighted", "label", "grid"])
def test_patches_are_contiguous_copies_of_their_location(volume, name):
    sampler, extra = _samplers((6, 5, 4))[name]
    image = volume["image"]
    patches = sampler(image, *extra(volume))
    assert patches and all(isinstance(p, MetaTensor) for p in patches)
    for patch in patches:
        location = patch.meta["location"]
        assert location.dtype == torch.int64 and location.shape == (6,)
        assert tuple(patch.shape) == (1, 6, 5, 4)
        torch.testing.assert_close(patch.as_tensor(), image.as_tensor()[_region(location)])
        assert patch.is_contiguous()
        # A copy that owns only its own voxels: it does not keep the volume alive.
        assert patch.untyped_storage().nbytes() == patch.numel() * patch.element_size()
        assert patch.untyped_storage().data_ptr() != image.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", ["uniform", "weighted", "label", "grid"])
def test_patch_affine_maps_patch_voxels_to_their_source_world_points(volume, name):
    sampler, extra = _samplers((6, 5, 4))[name]
    image = volume["image"]
    for patch in sampler(image, *extra(volume)):
        start = patch.meta["location"][:3].double()
        for voxel in ([0, 0, 0], [5, 4, 3], [2, 1, 3]):
            voxel = torch.tensor([*voxel, 1], dtype=torch.float64)
            source = torch.cat([voxel[:3] + start, torch.ones(1, dtype=torch.float64)])
            torch.testing.assert_close(patch.affine @ voxel, image.affine @ source)
        # Spacing and direction unchanged.
        torch.testing.assert_close(patch.affine[:3, :3], image.affine[:3, :3])


def test_patch_affine_and_pixels_match_monai_spatial_crop(volume):
    image = volume["image"]
    for patch in UniformSampler((6, 5, 4), num_samples=5).set_random_state(1)(image):
        location = patch.meta["location"].tolist()
        reference = SpatialCrop(roi_start=location[:3], roi_end=location[3:])(image)
        torch.testing.assert_close(patch.affine, reference.affine)
        torch.testing.assert_close(patch.as_tensor(), reference.as_tensor())


def test_meta_is_carried_and_not_shared(volume):
    image = volume["image"]
    image.meta["filename_or_obj"] = "subject.nii.gz"
    patches = UniformSampler(4, num_samples=2)(image)
    assert all(p.meta["filename_or_obj"] == "subject.nii.gz" for p in patches)
    patches[0].meta["extra"] = 1
    assert "extra" not in image.meta and "extra" not in patches[1].meta


@pytest.mark.parametrize("name", ["uniform", "weighted", "label", "grid"])
def test_inverse_puts_the_patch_back_with_the_original_affine(volume, name):
    sampler, extra = _samplers((6, 5, 4))[name]
    image = volume["image"]
    patch = sampler(image, *extra(volume))[-1]
    restored = sampler.inverse(patch)
    assert tuple(restored.shape) == tuple(image.shape)
    torch.testing.assert_close(restored.affine, image.affine)
    region = _region(patch.meta["location"])
    torch.testing.assert_close(restored[region].as_tensor(), image[region].as_tensor())
    outside = torch.ones(image.shape, dtype=torch.bool)
    outside[region] = False
    assert (restored.as_tensor()[outside] == 0).all()
    assert "location" not in restored.meta
    assert len(restored.applied_operations) == len(image.applied_operations)


def test_grid_inverse_with_padding_returns_the_unpadded_shape(volume):
    sampler = GridSampler((8, 8, 8), patch_overlap=4, padding_mode="reflect")
    image = volume["image"]
    patches = sampler(image)
    total = torch.zeros(image.shape)
    for patch in patches:
        restored = sampler.inverse(patch)
        assert tuple(restored.shape) == tuple(image.shape)
        torch.testing.assert_close(restored.affine, image.affine)
        total = torch.maximum(total, restored.as_tensor())
    torch.testing.assert_close(total, image.as_tensor())  # every voxel comes back from some patch


def test_grid_padding_modes(volume):
    image = volume["image"]
    constant = GridSampler(8, patch_overlap=4, padding_mode=7.5)(image)[0]
    assert constant.meta["location"].tolist()[:3] == [0, 0, 0]
    assert (constant[0, :2] == 7.5).all()  # two padded voxels (overlap / 2) come first
    torch.testing.assert_close(constant[0, 2:, 2:, 2:].as_tensor(), image[0, :6, :6, :6].as_tensor())
    with pytest.raises(ValueError, match="padding_mode='bogus'"):
        GridSampler(8, padding_mode="bogus")


def test_grid_len_and_locations_order():
    sampler = GridSampler((5, 4), patch_overlap=(2, 0), spatial_shape=(10, 8))
    assert len(sampler) == 6
    patches = sampler(torch.zeros(1, 10, 8))
    assert [p.meta["location"].tolist() for p in patches] == [
        [0, 0, 5, 4], [0, 4, 5, 8], [3, 0, 8, 4], [3, 4, 8, 8], [5, 0, 10, 4], [5, 4, 10, 8],
    ]  # fmt: skip
    assert bool(GridSampler(4))
    with pytest.raises(TypeError, match="spatial_shape"):
        len(GridSampler(4))


@pytest.mark.parametrize("name", ["uniform", "weighted", "label"])
def test_same_seed_same_patches_whatever_the_global_rngs(volume, name):
    sampler, extra = _samplers((6, 5, 4), num_samples=6)[name]
    sampler.set_random_state(123)
    first = [p.meta["location"].tolist() for p in sampler(volume["image"], *extra(volume))]
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    _ = torch.rand(10), np.random.rand(10), random.random()
    sampler.set_random_state(123)
    second = [p.meta["location"].tolist() for p in sampler(volume["image"], *extra(volume))]
    assert first == second
    third = [p.meta["location"].tolist() for p in sampler(volume["image"], *extra(volume))]
    assert third != second  # the stream moves on


def test_two_dimensional_images():
    image = MetaTensor(torch.rand(2, 20, 16))
    label = torch.zeros(1, 20, 16)
    label[0, 5:10, 5:10] = 1
    for sampler, extra in [
        (UniformSampler(6, num_samples=3), ()),
        (WeightedSampler((6, 4), num_samples=3), (label,)),
        (LabelSampler(6, num_samples=3), (label,)),
        (GridSampler((6, 4), patch_overlap=(2, 2)), ()),
    ]:
        for patch in sampler(image, *extra):
            location = patch.meta["location"]
            assert location.shape == (4,)
            assert tuple(patch.shape) == (2, *(location[2:] - location[:2]).tolist())
            torch.testing.assert_close(patch.as_tensor(), image.as_tensor()[_region(location)])
            restored = sampler.inverse(patch)
            assert tuple(restored.shape) == (2, 20, 16)


def test_plain_tensors_and_arrays_are_accepted():
    array = np.random.RandomState(0).rand(1, 10, 10, 10).astype(np.float32)
    patch = UniformSampler(4)(array)[0]
    assert isinstance(patch, MetaTensor)
    np.testing.assert_array_equal(
        patch.numpy(), array[(slice(None), *(slice(int(s), int(s) + 4) for s in patch.meta["location"][:3]))]
    )


def test_label_sampler_centres_lie_on_requested_classes(volume):
    label = volume["label"]
    sampler = LabelSampler(5, num_samples=50, label_probabilities={"2": 1}).set_random_state(0)
    for patch in sampler(label, label):
        assert patch[0, 2, 2, 2] == 2


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: UniformSampler(0), ValueError, r"patch_size=\[0\]"),
        (lambda: UniformSampler(4, num_samples=0), ValueError, "num_samples=0"),
        (lambda: WeightedSampler((4, 4, 4, 4)), ValueError, "4 values"),
        (lambda: LabelSampler(4, label_probabilities={"x": 1}), ValueError, "key 'x'"),
        (lambda: GridSampler(4, patch_overlap=3), ValueError, "even"),
        (lambda: GridSampler(4, patch_overlap=4), ValueError, "smaller"),
        (
            lambda: GridSampler((4, 4), patch_overlap=(2, 2, 2)),
            ValueError,
            "`patch_overlap` .* has 3 values but `patch_size`",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_data_dependent_errors(volume):
    image = volume["image"]
    with pytest.raises(ValueError, match=r"\(32, 32, 32\) exceeds the spatial shape \(20, 18, 16\).*pad"):
        UniformSampler(32)(image)
    with pytest.raises(ValueError, match="has 2 values but the image has 3"):
        UniformSampler((4, 4))(image)
    with pytest.raises(ValueError, match=r"channel-first.*\(20, 18\)"):
        UniformSampler(4)(torch.zeros(20, 18))
    with pytest.raises(ValueError, match=r"`probability_map` should have one channel.*\(2, 20, 18, 16\)"):
        WeightedSampler(4)(image, torch.ones(2, 20, 18, 16))
    with pytest.raises(ValueError, match=r"`probability_map` has spatial shape \(20, 18, 15\)"):
        WeightedSampler(4)(image, torch.ones(1, 20, 18, 15))
    with pytest.raises(ValueError, match=r"`label` has spatial shape"):
        LabelSampler(4)(image, torch.ones(1, 20, 18, 15))
    with pytest.raises(ValueError, match="`probability_map` is required"):
        WeightedSampler(4)(image)
    with pytest.raises(ValueError, match=r"after padding"):
        GridSampler(24, patch_overlap=4, padding_mode="edge")(image)
    with pytest.raises(RuntimeError, match="randomize=True"):
        UniformSampler(4)(image, randomize=False)
