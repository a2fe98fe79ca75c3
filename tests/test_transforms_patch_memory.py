"""Lent patch memory: samplers write their crops into it when a lender is active, into tensors of their own
otherwise."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from monai_patchqueue import UniformSamplerd
from monai_patchqueue.data.block_lender import BlockLender
from monai_patchqueue.transforms.functional import crop_patches
from monai_patchqueue.transforms.patch_memory import patch_metadata_shared, patches_written_to


def _lender(nbytes: int = 4096) -> BlockLender:
    return BlockLender(torch.zeros(nbytes, dtype=torch.uint8), ticket=None, release=lambda: None)


def test_a_sampler_inside_the_context_cuts_its_patches_into_consecutive_lent_slots():
    image = MetaTensor(torch.arange(216.0).reshape(1, 6, 6, 6))
    lender = _lender()
    with patches_written_to(lender):
        patches = UniformSamplerd("image", 2, num_samples=3)({"image": image})
    pointers = [patch["image"].data_ptr() for patch in patches]
    assert pointers == [lender.block.data_ptr() + 32 * index for index in range(3)]  # 2^3 floats per slot
    for patch in patches:
        start = patch["location"][:3].tolist()
        assert torch.equal(patch["image"].as_tensor(), image.as_tensor()[:, start[0] : start[0] + 2,
                                                                            start[1] : start[1] + 2,
                                                                            start[2] : start[2] + 2])  # fmt: skip


def test_crops_of_different_shapes_or_outside_the_context_get_their_own_tensors():
    image = torch.rand(1, 6, 6)
    lender = _lender()
    with patches_written_to(lender):
        mixed = crop_patches(image, np.array([[0, 0, 2, 2], [1, 1, 4, 4]]))
    outside = crop_patches(image, np.array([[0, 0, 2, 2]]))
    assert lender.nbytes == 0 and not any(lender.holds(patch) for patch in [*mixed, *outside])
    assert torch.equal(mixed[1].as_tensor(), image[:, 1:4, 1:4])


def test_a_full_lender_leaves_the_sampler_to_allocate():
    lender = _lender(nbytes=16)
    with patches_written_to(lender):
        patches = crop_patches(torch.rand(1, 6, 6), np.array([[0, 0, 3, 3], [3, 3, 6, 6]]))
    assert not any(lender.holds(patch) for patch in patches) and patches[0].shape == (1, 3, 3)


def _header_image() -> MetaTensor:
    meta = {"pixdim": np.array([1.0, 2.0, 3.0]), "dim": np.array([3, 6, 6, 6]), "descrip": "scan"}
    return MetaTensor(torch.rand(1, 6, 6, 6), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])), meta=meta)


def test_inside_patch_metadata_shared_the_patches_of_a_call_share_one_copy_of_the_header():
    image = _header_image()
    locations = np.array([[0, 0, 0, 2, 2, 2], [1, 2, 3, 3, 4, 5], [4, 4, 4, 6, 6, 6]])
    with patch_metadata_shared():
        shared = crop_patches(image, locations)
    own = crop_patches(image, locations)
    for key in ("pixdim", "dim"):
        assert len({id(patch.meta[key]) for patch in shared}) == 1 and shared[0].meta[key] is not image.meta[key]
        assert len({id(patch.meta[key]) for patch in own}) == 3
        assert all(np.array_equal(patch.meta[key], image.meta[key]) for patch in [*shared, *own])
    assert len({id(patch.meta) for patch in shared}) == 3  # each patch its own dict: its own affine and location
    for patch, location in zip(shared, locations):
        assert patch.meta["location"].tolist() == location.tolist()
        assert torch.equal(patch.affine[:3, 3], 2.0 * torch.as_tensor(location[:3], dtype=patch.affine.dtype))
    shared[0].meta["pixdim"][0] = 9.0
    assert image.meta["pixdim"][0] == 1.0  # the source's header is never shared


def test_patch_metadata_shared_false_and_the_end_of_the_block_give_each_patch_its_own_copy():
    image, locations = _header_image(), np.array([[0, 0, 0, 2, 2, 2], [1, 1, 1, 3, 3, 3]])
    with patch_metadata_shared():
        with patch_metadata_shared(False):
            inner = crop_patches(image, locations)
    after = crop_patches(image, locations)
    assert inner[0].meta["pixdim"] is not inner[1].meta["pixdim"]
    assert after[0].meta["pixdim"] is not after[1].meta["pixdim"]
