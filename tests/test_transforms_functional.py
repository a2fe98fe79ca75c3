"""The functional crop layer: lean MetaTensor construction equals MONAI's, and patches own their meta."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from monai_patchqueue.transforms.functional import crop_patches, new_metatensor, shifted_affine, shifted_affines


def test_new_metatensor_matches_the_monai_constructor():
    data = torch.rand(1, 4, 5, 6)
    meta = {"affine": torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64)), "filename_or_obj": "x"}
    ours = new_metatensor(data, dict(meta), [{"class": "A"}])
    theirs = MetaTensor(data, meta=dict(meta), applied_operations=[{"class": "A"}])
    assert ours.meta.keys() == theirs.meta.keys()
    torch.testing.assert_close(ours.affine, theirs.affine)
    assert ours.applied_operations == theirs.applied_operations
    assert ours.is_batch == theirs.is_batch and ours.pending_operations == theirs.pending_operations
    assert ours.spatial_ndim == theirs.spatial_ndim
    assert ours.data_ptr() == data.data_ptr()  # no copy of the voxels


def test_shifted_affines_agree_with_the_single_version():
    affine = torch.tensor([[0.0, -2.0, 0.5, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.3, 3.0, 5.0], [0, 0, 0, 1]],
                          dtype=torch.float64)  # fmt: skip
    starts = np.array([[0, 0, 0], [1, 2, 3], [7, 0, 5]])
    batched = shifted_affines(affine, starts)
    for start, result in zip(starts, batched):
        torch.testing.assert_close(result, shifted_affine(affine, start.tolist()))


def test_patches_own_their_meta_arrays_and_trace():
    image = MetaTensor(torch.rand(1, 8, 8, 8))
    image.meta["pixdim"] = np.array([1.0, 1.0, 1.0, 1.0])
    image.applied_operations = [{"class": "Earlier", "extra_info": {"value": [1]}}]
    first, second = crop_patches(image, np.array([[0, 0, 0, 4, 4, 4], [4, 4, 4, 8, 8, 8]]), {"class": "Crop"})
    first.meta["pixdim"][1] = 9.0  # MONAI updates pixdim in place
    first.applied_operations[0]["extra_info"]["value"].append(2)
    assert image.meta["pixdim"][1] == 1.0 and second.meta["pixdim"][1] == 1.0
    assert image.applied_operations[0]["extra_info"]["value"] == [1]
    assert [op["class"] for op in second.applied_operations] == ["Earlier", "Crop"]
    assert second.applied_operations[-1]["extra_info"]["location"] == [4, 4, 4, 8, 8, 8]
    assert second.applied_operations[-1]["orig_size"] == (8, 8, 8)
