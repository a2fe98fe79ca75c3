"""Slabs: patches copied in serving order into one tensor per entry, served as views with collated metadata."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_patchqueue import UniformSamplerd
from monai_patchqueue.data.slabs import PatchSlab, ServedPatch


def _patches(brain: dict, count: int) -> list[dict]:
    sampler = UniformSamplerd(["image", "label"], 8, num_samples=count)
    sampler.set_random_state(0)
    return sampler(brain)


def _slab_of(patches: list[dict], capacity: int | None = None) -> list[ServedPatch]:
    slab = PatchSlab(capacity or len(patches))
    for patch in patches:
        slab.add(patch)
    return slab.served()


def test_served_patches_hold_the_same_values_as_views_of_one_tensor_per_entry(brain):
    patches = _patches(brain, 5)
    expected = copy.deepcopy(patches)
    served = _slab_of(patches)
    assert [type(patch) for patch in served] == [ServedPatch] * 5 and [p.index for p in served] == list(range(5))
    for got, want in zip(served, expected):
        assert got.keys() == want.keys()
        for key in ("image", "label"):
            assert type(got[key]) is MetaTensor and torch.equal(got[key].as_tensor(), want[key].as_tensor())
            assert got[key].meta.keys() == want[key].meta.keys()
            for name, value in want[key].meta.items():
                if isinstance(value, (torch.Tensor, np.ndarray)):
                    assert np.array_equal(np.asarray(got[key].meta[name]), np.asarray(value), equal_nan=True), name
                else:
                    assert got[key].meta[name] == value or value != value, name
            assert got[key].applied_operations == want[key].applied_operations
        assert torch.equal(got["location"], want["location"])
    slab = served[0].slab
    for key in ("image", "label", "location"):
        assert len({patch[key].untyped_storage().data_ptr() for patch in served}) == 1  # one storage per entry
        assert slab.data[key].shape[0] == 5


def test_metadata_tensors_are_rows_of_the_collated_metadata_so_in_place_edits_reach_it(brain):
    served = _slab_of(_patches(brain, 3))
    collated = served[0].slab.meta["image"].collated
    assert collated["affine"].shape == (3, 4, 4)
    served[1]["image"].meta["affine"][0, 3] += 100.0  # an in-place edit of one patch's affine
    assert collated["affine"][1, 0, 3] == served[1]["image"].affine[0, 3]
    assert collated["affine"][0, 0, 3] != collated["affine"][1, 0, 3]
    pixdim = served[2]["image"].meta["pixdim"]  # a NumPy header array from the NIfTI file stays a NumPy array
    assert isinstance(pixdim, np.ndarray) and np.shares_memory(pixdim, collated["pixdim"].numpy())


def test_an_entry_that_changes_shape_within_a_slab_is_left_to_each_patch():
    patches = [{"x": torch.full((2,), float(i)), "y": torch.zeros(1 + (i == 2))} for i in range(4)]
    served = _slab_of(patches)
    assert set(served[0].slab.data) == {"x"}
    assert [patch["y"].shape[0] for patch in served] == [1, 1, 2, 1]
    assert [float(patch["x"][0]) for patch in served] == [0.0, 1.0, 2.0, 3.0]


def test_metadata_of_a_type_not_collated_per_row_is_left_to_each_batch():
    patches = [MetaTensor(torch.zeros(2), meta={"affine": torch.eye(4), "tags": ["a", "b"]}) for _ in range(3)]
    served = _slab_of([{"x": patch} for patch in patches])
    assert "x" in served[0].slab.data and "x" not in served[0].slab.meta
    assert served[1]["x"].meta["tags"] == ["a", "b"]


def test_a_slab_served_before_it_is_full_holds_only_its_patches():
    served = _slab_of([{"x": torch.ones(3)}, {"x": torch.ones(3)}], capacity=16)
    assert served[0].slab.data["x"].shape == (2, 3)
    slab = PatchSlab(1)
    slab.add({"x": torch.ones(1)})
    with pytest.raises(IndexError, match="holds 1 patches already"):
        slab.add({"x": torch.ones(1)})


def test_dtypes_numpy_lacks_are_copied_too():
    served = _slab_of([{"x": torch.full((3,), float(i), dtype=torch.bfloat16)} for i in range(2)])
    assert served[1]["x"].dtype == torch.bfloat16 and served[1]["x"].tolist() == [1.0, 1.0, 1.0]


def test_copies_and_pickles_of_a_served_patch_are_plain_dicts_of_their_own(brain):
    served = _slab_of(_patches(brain, 4))
    for copied in (copy.copy(served[1]), copy.deepcopy(served[1]), pickle.loads(pickle.dumps(served[1]))):
        assert type(copied) is dict and torch.equal(copied["image"], served[1]["image"])
    assert served[1].intact()
    served[1]["image"] = served[1]["image"] + 0
    assert not served[1].intact()


@pytest.mark.parametrize(
    "edit",
    [
        lambda meta: meta.__setitem__("affine", meta["affine"].clone()),  # replaced by an equal copy
        lambda meta: meta.update(note="added"),
        lambda meta: meta.update(moved=meta.pop("dim")),  # as many entries, one of them under another key
    ],
    ids=["replaced", "added", "moved"],
)
def test_a_served_patch_whose_metadata_entries_changed_is_not_intact(brain, edit):
    served = _slab_of(_patches(brain, 2))
    assert "image" in served[0].slab.meta and served[0].intact() and served[1].intact()
    edit(served[1]["image"].meta)
    assert served[0].intact() and not served[1].intact()
