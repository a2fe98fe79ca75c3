"""Batches of served patches come from their slabs (views, no stacking) and equal MONAI's collation."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.data.utils import list_data_collate
from torch.utils.data import DataLoader, default_collate

from monai_patchqueue import PatchQueueDataset, UniformSamplerd
from monai_patchqueue.data import serving
from monai_patchqueue.data.served_collate import collate_served_patches, register_served_collation
from monai_patchqueue.data.slabs import PatchSlab, ServedPatch

register_served_collation()


def assert_same(got, want, path="batch"):
    """Equal types, dtypes, shapes and values (NaN equal to NaN), MetaTensor attributes included."""
    assert type(got) is type(want), (path, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape) == (want.dtype, want.shape), path
        assert torch.equal(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor)) or torch.allclose(
            got.as_subclass(torch.Tensor).double(), want.as_subclass(torch.Tensor).double(), equal_nan=True
        ), path
        if isinstance(want, MetaTensor):
            assert got.__dict__.keys() == want.__dict__.keys(), path
            for name in want.__dict__:
                assert_same(got.__dict__[name], want.__dict__[name], f"{path}.{name}")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), (path, set(got) ^ set(want))
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for index, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{path}[{index}]")
    else:
        assert got == want or (got != got and want != want), (path, got, want)


def _served(brain: dict, count: int, capacity: int) -> list:
    sampler = UniformSamplerd(["image", "label"], 8, num_samples=count)
    sampler.set_random_state(0)
    served = []
    patches = sampler(brain)
    for start in range(0, count, capacity):
        slab = PatchSlab(capacity)
        for patch in patches[start : start + capacity]:
            slab.add({**patch, "subject": "s-01", "weight": 0.5})
        served += slab.served()
    return served


@pytest.mark.parametrize(
    "rows",
    [range(0, 8), range(8, 12), range(3, 4), range(2, 14), [5, 1, 9], [4, 4, 4], range(0, 16)],
    ids=["one-slab", "part-of-a-slab", "single", "two-slabs", "any-order", "repeated", "whole"],
)
def test_batches_equal_monai_collation_of_the_same_patches(brain, rows):
    served = _served(brain, 16, capacity=8)
    batch = [served[row] for row in rows]
    assert_same(default_collate(batch), list_data_collate([dict(patch) for patch in batch]))


def test_a_batch_within_one_slab_is_a_view_of_it(brain):
    served = _served(brain, 16, capacity=8)
    batch = default_collate(served[8:12])
    slab = served[8].slab
    for key in ("image", "label", "location"):
        assert batch[key].data_ptr() == slab.data[key][0:4].data_ptr()
        assert batch[key].untyped_storage().data_ptr() == slab.data[key].untyped_storage().data_ptr()
    assert batch["image"].meta["affine"].data_ptr() == slab.meta["image"].collated["affine"].data_ptr()


def _replace_entry(patch):
    patch["image"] = patch["image"].clone()


def _replace_metadata_entry(patch):
    patch["image"].meta["affine"] = patch["image"].meta["affine"] * 2


def _add_metadata_entry(patch):
    patch["label"].meta["note"] = "edited"


def _edit_metadata_in_place(patch):
    patch["image"].meta["affine"][0, 3] = 7.0


def _edit_data_in_place(patch):
    patch["label"].zero_()


def _add_entry(patch):
    patch["extra"] = torch.ones(2)


@pytest.mark.parametrize(
    "edit",
    [
        _replace_entry,
        _replace_metadata_entry,
        _add_metadata_entry,
        _edit_metadata_in_place,
        _edit_data_in_place,
        _add_entry,
    ],
)
def test_patches_changed_after_serving_collate_as_they_now_are(brain, edit):
    served = _served(brain, 8, capacity=8)
    for patch in served:
        edit(patch)
    assert_same(default_collate(served[:4]), list_data_collate([dict(patch) for patch in served[:4]]))


def test_served_and_other_patches_mixed_collate_the_usual_way(brain):
    served = _served(brain, 8, capacity=8)
    mixed = [served[0], dict(served[1]), served[2]]
    assert_same(collate_served_patches(mixed), list_data_collate([dict(patch) for patch in mixed]))


def test_a_queue_read_by_torch_dataloader_gives_monai_batches_without_copies(brain):
    with PatchQueueDataset([brain, brain], UniformSamplerd(["image", "label"], 8), 16, 8, seed=0) as queue:
        batches = list(DataLoader(queue, batch_size=4))
        queue.set_epoch(0)
        patches = list(queue)  # the same stream again
    for index, batch in enumerate(batches):
        assert_same(batch, list_data_collate([dict(patch) for patch in patches[4 * index : 4 * index + 4]]))
    assert len({batch["image"].untyped_storage().data_ptr() for batch in batches}) == 1  # views of one slab of 16


def _types_seen_by(collate_fn, record: list):
    def collate(batch):
        record.extend(type(patch) for patch in batch)
        return collate_fn(batch)

    return collate


@pytest.mark.parametrize("num_workers", [0, 1])
def test_patches_are_laid_out_in_slabs_only_while_batches_are_collated_from_them(brain, num_workers):
    """MONAI's list_data_collate stacks key by key, so slabs would be one copy more: after a few slabs without
    a batch collated from them the queue serves patches as they are; torch's default_collate keeps them."""
    window = serving._PROBE_WINDOW_SLABS * serving.SLAB_PATCHES
    sampler = UniformSamplerd(["image", "label"], 8)
    with PatchQueueDataset([brain] * 12, sampler, 16, 16, num_workers=num_workers, seed=0) as queue:
        by_monai, by_torch = [], []
        monai_batches = list(DataLoader(queue, batch_size=4, collate_fn=_types_seen_by(list_data_collate, by_monai)))
        torch_batches = list(DataLoader(queue, batch_size=4, collate_fn=_types_seen_by(default_collate, by_torch)))
        queue.set_epoch(0)
        first_epoch = [dict(patch) for patch in queue]
    assert len(by_monai) == len(by_torch) == 192
    assert by_monai[:window] == [ServedPatch] * window
    assert by_monai[window + 2 * serving.SLAB_PATCHES :] == [dict] * (192 - window - 2 * serving.SLAB_PATCHES)
    slab = serving.SLAB_PATCHES  # each epoch starts with a slab; with workers the next chunk may be built before
    assert by_torch[:slab] == [ServedPatch] * slab  # the first batch is collated
    assert by_torch[2 * slab :] == [ServedPatch] * (192 - 2 * slab)
    for index, batch in enumerate(monai_batches):  # the same patches either way
        assert_same(batch, list_data_collate(first_epoch[4 * index : 4 * index + 4]))
    assert len(torch_batches) == 48


def _probed_slabs(brain: dict, count: int, capacity: int, probe) -> list[list]:
    sampler = UniformSamplerd(["image", "label"], 8, num_samples=count)
    sampler.set_random_state(1)
    patches, slabs = sampler(brain), []
    for start in range(0, count, capacity):
        slab = PatchSlab(capacity, probe)
        for patch in patches[start : start + capacity]:
            slab.add({**patch, "subject": "s-01"})
        slabs.append(slab)
    return slabs


def test_a_slab_laid_out_after_batches_were_collated_slices_their_rows_ahead_and_batches_stay_right(brain):
    from monai_patchqueue.data.slabs import CollationProbe

    probe = CollationProbe(window=64, probe_every=4)
    first, second, third = _probed_slabs(brain, 24, capacity=8, probe=probe)
    served = first.served()
    for start in (0, 4):
        default_collate(served[start : start + 4])
    assert probe.rows_taken == [(0, 4), (4, 8)]
    later = second.served()  # laid out after those batches: their rows are sliced ahead, in this thread
    assert set(second.meta["image"]._rows) == {(0, 4), (4, 8)}
    batches = [default_collate(later[start : start + 4]) for start in (0, 4)]
    for start, batch in zip((0, 4), batches):
        assert_same(batch, list_data_collate([dict(patch) for patch in later[start : start + 4]]))
    batches[0]["image"].meta["note"] = "mine"
    batches[0]["image"].meta["filename_or_obj"].append("extra")
    again = default_collate(later[0:4])  # the same rows once more: a dict and lists of its own
    assert "note" not in again["image"].meta and len(again["image"].meta["filename_or_obj"]) == 4
    odd = third.served()
    assert_same(default_collate(odd[1:6]), list_data_collate([dict(patch) for patch in odd[1:6]]))  # not prepared
