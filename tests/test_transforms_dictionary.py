"""Dictionary samplers: keys, flattening by Compose and DataLoader, inverse through Compose/Invertd, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor, list_data_collate
from monai.transforms import Compose, Invertd, Lambdad, ScaleIntensityd, SpatialPadd

from monai_patchqueue import GridSamplerd, LabelSamplerd, UniformSamplerd, WeightedSamplerd
from monai_patchqueue.transforms.dictionary import is_patch_sampler

KEYS = ["image", "label"]


def _random_samplers(num_samples=3, patch_size=(6, 5, 4)):
    return [
        UniformSamplerd(KEYS, patch_size, num_samples=num_samples),
        WeightedSamplerd(KEYS, patch_size, probability_key="image", num_samples=num_samples),
        LabelSamplerd(KEYS, patch_size, label_key="label", num_samples=num_samples,
                      label_probabilities={0: 1, 1: 1, 2: 1}),
    ]  # fmt: skip


def _all_samplers():
    return [*_random_samplers(), GridSamplerd(KEYS, (6, 5, 4), patch_overlap=2)]


def _region(location):
    half = len(location) // 2
    return (slice(None), *tuple(slice(int(s), int(e)) for s, e in zip(location[:half], location[half:])))


@pytest.mark.parametrize("sampler", _all_samplers(), ids=lambda s: type(s).__name__)
def test_every_key_is_cropped_at_the_same_location(volume, sampler):
    patches = sampler(volume)
    assert isinstance(patches, list) and len(patches) >= 3
    for patch in patches:
        location = patch["location"]
        assert location.dtype == torch.int64 and location.shape == (6,)
        for key in KEYS:
            assert torch.equal(patch[key].meta["location"], location)
            torch.testing.assert_close(patch[key].as_tensor(), volume[key].as_tensor()[_region(location)])
        assert patch["subject"] == "s-01"  # non-key entries are carried


def test_grid_returns_all_patches_in_lexicographic_order(volume):
    patches = GridSamplerd(KEYS, (10, 9, 8))(volume)
    assert [p["location"].tolist()[:3] for p in patches] == [
        [0, 0, 0], [0, 0, 8], [0, 9, 0], [0, 9, 8], [10, 0, 0], [10, 0, 8], [10, 9, 0], [10, 9, 8],
    ]  # fmt: skip
    assert len(GridSamplerd(KEYS, (10, 9, 8), spatial_shape=(20, 18, 16))) == 8


def test_grid_matches_torchio_patches():
    import torchio as tio

    image = torch.rand(1, 13, 11, 9)
    subject = tio.Subject(image=tio.ScalarImage(tensor=image))
    theirs = list(tio.GridSampler(subject, patch_size=(6, 5, 4), patch_overlap=(2, 2, 0))(subject))
    ours = GridSamplerd("image", (6, 5, 4), patch_overlap=(2, 2, 0))({"image": MetaTensor(image)})
    assert len(ours) == len(theirs)
    for our, their in zip(ours, theirs):
        assert our["location"].tolist() == their[tio.LOCATION].tolist()
        torch.testing.assert_close(our["image"].as_tensor(), their["image"].data)


def test_compose_flattens_and_applies_later_transforms_to_each_patch(volume):
    pipeline = Compose([UniformSamplerd(KEYS, 4, num_samples=5), ScaleIntensityd("image")])
    patches = pipeline(volume)
    assert len(patches) == 5
    for patch in patches:
        assert patch["image"].min() == 0 and patch["image"].max() == 1


def test_monai_dataloader_collates_patches_and_locations(volume):
    dataset = Dataset([volume, volume], transform=UniformSamplerd(KEYS, 4, num_samples=3))
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert tuple(batch["image"].shape) == (6, 1, 4, 4, 4)
    assert tuple(batch["location"].shape) == (6, 6) and batch["location"].dtype == torch.int64
    torch.testing.assert_close(batch["image"].affine[0][:3, :3], volume["image"].affine[:3, :3])
    # Each patch keeps its own affine in the batch.
    for index in range(6):
        start = batch["location"][index, :3].double()
        expected = volume["image"].affine[:3, 3] + volume["image"].affine[:3, :3] @ start
        torch.testing.assert_close(batch["image"].affine[index][:3, 3], expected)


def test_torch_dataloader_with_monai_collation(volume):
    dataset = Dataset([volume] * 3, transform=_random_samplers(num_samples=2)[2])
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=list_data_collate)
    batch = next(iter(loader))
    assert tuple(batch["label"].shape) == (6, 1, 6, 5, 4)
    assert tuple(batch["location"].shape) == (6, 6)


@pytest.mark.parametrize("sampler", _all_samplers(), ids=lambda s: type(s).__name__)
def test_compose_inverse_restores_the_shape_before_padding(volume, sampler):
    pipeline = Compose([SpatialPadd(KEYS, (22, 20, 18)), sampler])
    patch = pipeline(volume)[-1]
    restored = pipeline.inverse(patch)
    for key in KEYS:
        assert tuple(restored[key].shape) == (1, 20, 18, 16)
        torch.testing.assert_close(restored[key].affine, volume[key].affine)
        assert restored[key].applied_operations == []
    assert "location" not in restored


def test_inverse_of_a_prediction_through_invertd(volume):
    sampler = UniformSamplerd(KEYS, (6, 5, 4), num_samples=2)
    pipeline = Compose([SpatialPadd(KEYS, (22, 20, 18)), sampler])
    patch = pipeline(volume)[0]
    patch["pred"] = patch["image"] * 2
    inverter = Invertd("pred", transform=pipeline, orig_keys="image", nearest_interp=False)
    restored = inverter(patch)["pred"]
    assert tuple(restored.shape) == (1, 20, 18, 16)
    location = patch["location"].tolist()
    unpadded = [location[0] - 1, location[1] - 1, location[2] - 1, location[3] - 1, location[4] - 1, location[5] - 1]
    region = _region(unpadded)
    torch.testing.assert_close(restored[region].as_tensor(), 2 * volume["image"][region].as_tensor())


def test_grid_inverse_with_padding_through_compose(volume):
    sampler = GridSamplerd(KEYS, 8, patch_overlap=4, padding_mode="constant")
    restored = [sampler.inverse(patch) for patch in sampler(volume)]
    stacked = torch.stack([r["image"].as_tensor() for r in restored]).amax(0)
    torch.testing.assert_close(stacked, volume["image"].as_tensor())


@pytest.mark.parametrize("index", range(3))
def test_compose_set_random_state_reaches_the_sampler(volume, index):
    def locations():
        pipeline = Compose([_random_samplers()[index]]).set_random_state(42)
        return [p["location"].tolist() for p in pipeline(volume)]

    first = locations()
    torch.manual_seed(1)
    np.random.seed(1)
    assert locations() == first


def _worker_locations(volume, seed):
    transform = Compose([Lambdad("subject", lambda s: s), UniformSamplerd(KEYS, 4, num_samples=2)])
    dataset = Dataset([volume] * 4, transform=transform)
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    return [batch["location"].tolist() for batch in loader]


def test_monai_dataloader_worker_seeding_reaches_the_sampler(volume):
    first = _worker_locations(volume, 0)
    assert first == _worker_locations(volume, 0)  # same base seed, same patches
    assert first != _worker_locations(volume, 1)
    # Items 0 and 1 go to workers 0 and 1: different workers draw different streams.
    assert first[0] != first[1]


def test_one_hot_label_key_not_in_keys(volume):
    one_hot = torch.cat([volume["label"] == c for c in range(3)]).float()
    data = {"image": volume["image"], "onehot": one_hot}
    patches = LabelSamplerd("image", 3, label_key="onehot", num_samples=20)(data)
    for patch in patches:
        centre = patch["location"][:3] + 1
        assert volume["label"][0][tuple(centre.tolist())] > 0  # channel 0 (background) is excluded by default
        assert patch["onehot"] is one_hot  # not a key: carried by reference, not cropped


def test_allow_missing_keys(volume):
    sampler = UniformSamplerd(["image", "missing"], 4, allow_missing_keys=True)
    assert tuple(sampler(volume)[0]["image"].shape) == (1, 4, 4, 4)
    with pytest.raises(KeyError, match="missing"):
        UniformSamplerd(["image", "missing"], 4)(volume)


def test_dictionary_errors_name_keys_and_values(volume):
    with pytest.raises(ValueError, match=r"spatial shape.*'image': \(20, 18, 16\).*'other': \(20, 18, 15\)"):
        UniformSamplerd(["image", "other"], 4)({**volume, "other": torch.zeros(1, 20, 18, 15)})
    with pytest.raises(KeyError, match=r"`probability_key` 'weights' is not in the data"):
        WeightedSamplerd("image", 4, probability_key="weights")(volume)
    with pytest.raises(KeyError, match=r"`label_key` 'seg' is not in the data"):
        LabelSamplerd("image", 4, label_key="seg")(volume)
    with pytest.raises(ValueError, match=r"`probability_key` 'w' has spatial shape \(20, 18, 15\)"):
        WeightedSamplerd("image", 4, probability_key="w")({**volume, "w": torch.ones(1, 20, 18, 15)})
    with pytest.raises(ValueError, match=r"exceeds the spatial shape \(20, 18, 16\) of key 'image'"):
        UniformSamplerd("image", 17)(volume)
    with pytest.raises(ValueError, match=r"probability_key 'w'. must be non-negative"):
        WeightedSamplerd("image", 4, probability_key="w")({**volume, "w": -torch.ones(1, 20, 18, 16)})
    with pytest.raises(ValueError, match=r"label_key 'label'.*no positive value.*pad"):
        LabelSamplerd("image", 4, label_key="label")({**volume, "label": torch.zeros(1, 20, 18, 16)})


def test_only_the_packages_own_samplers_count_as_patch_samplers():
    class Subclassed(UniformSamplerd):
        pass

    own = [UniformSamplerd("image", 2), WeightedSamplerd("image", 2, "w"), LabelSamplerd("image", 2, "l")]
    own.append(GridSamplerd("image", 2))
    assert all(is_patch_sampler(sampler) for sampler in own)
    assert not any(is_patch_sampler(other) for other in (Subclassed("image", 2), Compose(own[:1]), lambda d: [d]))
