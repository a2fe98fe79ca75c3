"""Lending a worker's shared block to the samplers: patches cut in place, packed without a copy, nothing lost."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import RandSpatialCropSamplesd
from torch.utils.data import DataLoader

from monai_patchqueue import UniformSamplerd
from monai_patchqueue.data.background import _PackedWork
from monai_patchqueue.data.block_lender import BlockLender
from monai_patchqueue.data.schedule import SubjectTask
from monai_patchqueue.data.shared_blocks import SharedBlocks, block_view, close_returns, open_returns
from monai_patchqueue.data.subject_patches import SubjectError, SubjectPatches
from monai_patchqueue.data.transport import PatchPack
from monai_patchqueue.transforms.patch_memory import new_patch_tensors, patches_written_to

KEYS = ["image", "label"]


def _subjects(count: int, size: int = 10) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(1, size, size, size, generator=generator) + i,
            "label": torch.randint(0, 3, (1, size, size, size), generator=generator, dtype=torch.uint8),
            "id": i,
        }
        for i in range(count)
    ]


def _task(subject: int = 0, count: int = 5) -> SubjectTask:
    return SubjectTask(epoch=0, position=subject, subject=subject, count=count, seed=subject + 11)


def _lender(nbytes: int, released: list) -> BlockLender:
    return BlockLender(torch.zeros(nbytes, dtype=torch.uint8), ticket="lent", release=lambda: released.append(1))


def _plain_take(nbytes: int):
    return torch.zeros(nbytes, dtype=torch.uint8), "taken"


def test_lent_stacks_are_aligned_consecutive_views_of_the_block_and_refused_when_it_is_full():
    lender = _lender(1000, [])
    first = lender.stack(2, (3, 5), torch.float32)  # 120 bytes
    second = lender.stack(1, (10,), torch.uint8)
    base = lender.block.data_ptr()
    assert first.data_ptr() == base and second.data_ptr() == base + 128  # 64-byte aligned
    assert lender.holds(first[1]) and not lender.holds(torch.zeros(3))
    assert lender.stack(1, (1000,), torch.uint8) is None  # no room left: the caller allocates its own
    with patches_written_to(lender):
        lent = new_patch_tensors(2, (4,), torch.int64)
        own = new_patch_tensors(1, (500,), torch.int64)
    assert all(lender.holds(t) for t in lent) and not lender.holds(own[0])
    assert not lender.holds(new_patch_tensors(1, (4,), torch.int64)[0])  # outside the `with`: own tensors


def test_patches_cut_into_a_lent_block_are_packed_in_place_and_unpack_to_the_same_values():
    work = SubjectPatches(_subjects(1), UniformSamplerd(KEYS, 4))
    _, expected = work.prepare(_task())
    lender = _lender(2**16, released := [])
    _, patches = work.prepare(_task(), lender)
    assert all(lender.holds(patch[key]) for patch in patches for key in KEYS)
    pack = PatchPack(patches, _plain_take, lender)
    assert pack.block is lender.block and pack.ticket == "lent" and not released
    assert pack.copied_keys == ("location",)  # image and label stayed where the sampler cut them
    for key in KEYS:  # the packed image and label are the lent slots themselves
        dtype, offset, shape = pack.layout[key]
        assert block_view(pack.block, dtype, offset, shape)[2].data_ptr() == patches[2][key].data_ptr()
    for got, want in zip(pack.unpack(), expected):
        assert torch.equal(got["location"], want["location"]) and got["id"] == want["id"]
        for key in KEYS:
            assert torch.equal(got[key], want[key]) and torch.equal(got[key].affine, want[key].affine)


def test_a_patch_transform_returning_new_tensors_is_copied_behind_the_lent_slots():
    doubled = SubjectPatches(
        _subjects(1), UniformSamplerd(KEYS, 4), patch_transform=lambda p: {**p, "image": p["image"] * 2}
    )
    _, expected = doubled.prepare(_task())
    lender = _lender(2**16, released := [])
    _, patches = doubled.prepare(_task(), lender)
    pack = PatchPack(patches, _plain_take, lender)
    assert pack.copied_keys == ("image", "location") and pack.block is lender.block and not released
    assert pack.layout["image"][1] >= lender.nbytes  # behind every lent slot: nothing overwritten
    for got, want in zip(pack.unpack(), expected):
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])


def test_a_sampler_that_allocates_its_own_patches_leaves_the_lent_slots_unused():
    work = SubjectPatches(_subjects(1), RandSpatialCropSamplesd(KEYS, (4, 4, 4), num_samples=5, random_size=False))
    lender = _lender(2**16, [])
    _, patches = work.prepare(_task(), lender)
    pack = PatchPack(patches, _plain_take, lender)
    assert lender.nbytes == 0 and set(pack.copied_keys) == set(KEYS)
    assert all(patch["image"].untyped_storage().nbytes() == 4 * 64 for patch in patches)  # compact copies


def test_a_pack_that_does_not_fit_the_lent_block_releases_it_and_takes_one_of_its_size():
    work = SubjectPatches(_subjects(1), UniformSamplerd(KEYS, 4))
    _, expected = work.prepare(_task())
    lender = _lender(5 * 4 * 64 + 10, released := [])  # room for the images, not for the labels
    _, patches = work.prepare(_task(), lender)
    pack = PatchPack(patches, _plain_take, lender)
    assert released == [1] and pack.ticket == "taken" and set(pack.copied_keys) == {*KEYS, "location"}
    for got, want in zip(pack.unpack(), expected):
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])


def test_a_worker_lends_its_block_from_the_second_subject_on():
    token, pipes = open_returns(1)
    packed = _PackedWork(SubjectPatches(_subjects(3), UniformSamplerd(KEYS, 4)), token, pipes)
    try:
        loader = DataLoader(packed, batch_size=None, sampler=[_task(s) for s in range(3)], num_workers=1,
                            collate_fn=lambda result: result)  # fmt: skip
        copied = [pack.copied_keys for _, pack in loader]  # packed in a real worker process
    finally:
        close_returns(token)
    assert copied == [(*KEYS, "location"), ("location",), ("location",)]


def test_the_block_lent_for_a_subject_that_fails_goes_back_to_the_pool():
    token, pipes = open_returns(1)
    packed = _PackedWork(SubjectPatches([{"image": "not an image"}], UniformSamplerd(KEYS, 4)), token, pipes)
    packed._worker, packed._blocks = 0, SharedBlocks(pipes[0], capacity=2)  # as a worker sets them up
    packed._last_nbytes = 2**16  # a subject was packed before: the next one is lent a block
    try:
        with pytest.raises(SubjectError, match="subject 0"):
            packed[_task(0)]
        assert packed._blocks._free == {0}
    finally:
        close_returns(token)


def test_a_patch_that_cannot_be_pickled_fails_before_any_block_is_taken():
    taken = []
    patches = [{"image": torch.zeros(1, 2, 2), "callback": lambda: None}]
    with pytest.raises(Exception, match="lambda"):
        PatchPack(patches, lambda nbytes: taken.append(nbytes))
    assert not taken  # the worker's pool loses no block to the failure
