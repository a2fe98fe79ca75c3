"""Lent patch memory: samplers write their crops into it when a lender is active, into tensors of their own
otherwise."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from monai_patchqueue import UniformSamplerd
from monai_patchqueue.data.block_lender import BlockLender
from monai_patchqueue.transforms.functional import crop_patches
from monai_patchqueue.transforms.patch_memory import patches_written_to


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
