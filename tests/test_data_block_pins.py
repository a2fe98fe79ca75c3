"""Pinned blocks: received patches served as views of their worker's block, which goes back once they are gone."""

from __future__ import annotations

import contextlib
import gc
import pickle
import weakref

import pytest
import torch
from monai.data import MetaTensor
from torch.utils.data import DataLoader

from monai_patchqueue import PatchQueueDataset, UniformSamplerd
from monai_patchqueue.data import shared_blocks
from monai_patchqueue.data.background import BLOCKS_PER_WORKER, BackgroundTasks
from monai_patchqueue.data.block_pins import BlockPins, pinned_blocks_per_worker
from monai_patchqueue.data.planner import EpochPlanner
from monai_patchqueue.data.serving import EpochServer
from monai_patchqueue.data.shared_blocks import BlockTicket, SharedBlocks, block_view, close_returns, open_returns
from monai_patchqueue.data.subject_patches import SubjectPatches
from monai_patchqueue.data.transport import PatchPack


@contextlib.contextmanager
def return_pipes(num_workers: int):
    token, pipes = open_returns(num_workers)
    try:
        yield token, pipes
    finally:
        close_returns(token)


def returned(pipe) -> list[int]:
    indices = []
    while not pipe.empty():
        indices.append(pipe.get())
    return indices


def shares_memory(tensor: torch.Tensor, block: torch.Tensor) -> bool:
    start = block.data_ptr()
    return start <= tensor.data_ptr() < start + block.numel()


def test_a_pinned_block_goes_back_to_its_worker_only_once_every_view_cut_from_it_is_gone():
    with return_pipes(1) as (token, pipes):
        pins = BlockPins(per_worker=2, kept=2)
        block = torch.zeros(1024, dtype=torch.uint8)
        pinned = pins.pinned(BlockTicket(token, 0, 3), block, 512)
        floats = block_view(pinned, torch.float32, 64, (2, 1, 8))
        patch = MetaTensor(floats[1], meta={"filename_or_obj": "a.nii"})
        floats.fill_(1.5)
        assert float(block[64:128].view(torch.float32).sum()) == 16 * 1.5  # the views write the block itself
        del pinned, floats
        assert pins.return_released() == 0 and returned(pipes[0]) == [] and pins.held == 1
        derived = patch[:, 2:]  # MONAI's slicing keeps viewing the block
        del patch
        gc.collect()
        assert pins.return_released() == 0 and returned(pipes[0]) == []
        del derived
        assert pins.return_released() == 1 and returned(pipes[0]) == [3] and pins.held == 0


def test_each_worker_pins_at_most_its_budget_and_a_returned_block_frees_its_pin():
    with return_pipes(2) as (token, pipes):
        pins = BlockPins(per_worker=1, kept=1)
        block = torch.zeros(256, dtype=torch.uint8)
        first = pins.pinned(BlockTicket(token, 0, 0), block, 64)
        assert pins.pinned(BlockTicket(token, 0, 1), block, 64) is None  # worker 0's budget is spent
        other = pins.pinned(BlockTicket(token, 1, 0), block, 64)  # worker 1 has its own
        assert other is not None and pins.held == 2
        del first
        pins.return_released()
        assert pins.pinned(BlockTicket(token, 0, 1), block, 64) is not None
        assert returned(pipes[0]) == [0] and returned(pipes[1]) == []


def test_a_block_released_after_its_pipes_closed_is_dropped_without_error():
    token, pipes = open_returns(1)
    pins = BlockPins(per_worker=1, kept=1)
    view = pins.pinned(BlockTicket(token, 0, 0), torch.zeros(64, dtype=torch.uint8), 64)
    close_returns(token)  # the workers were shut down while the training loop still held patches
    del view
    assert pins.return_released() == 1 and pipes[0].empty()


def test_views_that_die_after_the_pins_closed_leave_nothing_holding_their_block():
    token, pipes = open_returns(1)
    pins = BlockPins(per_worker=1, kept=1)
    block = torch.zeros(64, dtype=torch.uint8)
    block_alive = weakref.ref(block)
    view = pins.pinned(BlockTicket(token, 0, 0), block, 64)
    close_returns(token)
    pins.close()  # the queue closed
    del view, block
    gc.collect()
    assert block_alive() is None and pins.return_released() == 0 and pipes[0].empty()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int64])
def test_a_received_pack_serves_views_of_its_block_while_pins_last_and_copies_out_after(dtype):
    with return_pipes(1) as (token, pipes):
        blocks = SharedBlocks(pipes[0], capacity=2)

        def take(nbytes):
            block, index = blocks.take(nbytes)
            return block, BlockTicket(token, 0, index)

        def patches(first: int) -> list[dict]:
            return [{"image": torch.full((1, 4, 4), first + i).to(dtype), "id": i} for i in range(3)]

        pins = BlockPins(per_worker=1, kept=1)
        pinned_pack = pickle.loads(pickle.dumps(PatchPack(patches(0), take)))  # as received from a worker
        pinned_block = pinned_pack.block
        served = pinned_pack.unpack(pins)
        assert all(shares_memory(p["image"], pinned_block) for p in served)
        assert [p["image"].dtype for p in served] == [dtype] * 3
        assert [float(p["image"].float().mean()) for p in served] == [0.0, 1.0, 2.0]
        with pytest.raises(RuntimeError, match="unpacked already"):
            pinned_pack.unpack(pins)
        del pinned_pack
        assert returned(pipes[0]) == []  # the views hold it

        copied_pack = pickle.loads(pickle.dumps(PatchPack(patches(10), take)))  # block 1: the budget is spent
        copied_block = copied_pack.block
        copied = copied_pack.unpack(pins)
        assert not any(shares_memory(p["image"], copied_block) for p in copied)
        assert returned(pipes[0]) == [1]  # handed back at once
        assert [float(p["image"].float().mean()) for p in copied] == [10.0, 11.0, 12.0]

        del served
        assert pins.return_released() == 1 and returned(pipes[0]) == [0]


def test_patches_held_from_pinned_blocks_keep_their_values_while_the_workers_go_on_with_other_blocks():
    subjects = [{"image": torch.full((1, 8, 8, 8), float(i))} for i in range(12)]
    work = SubjectPatches(subjects, UniformSamplerd("image", 4))
    planner = EpochPlanner([5] * 12, seed=0, shuffle_subjects=True)
    background = BackgroundTasks(work, planner, num_workers=2, pins=BlockPins(per_worker=2, kept=4))
    token = background._returns_token
    try:
        held = [(task.subject, patches) for _, (task, patches) in zip(range(36), background.results(epoch=0))]
        pinned_now = background._pins.held
        mapped = [block for key, block in shared_blocks._mapped.items() if key[0] == token]
    finally:
        background.close()
    views = 0
    for subject, patches in held:  # a reused pinned block would have overwritten its subject's patches
        assert len(patches) == 5 and all(torch.all(patch["image"] == subject) for patch in patches)
        storages = {patch["image"].untyped_storage().data_ptr() for patch in patches}
        if len(storages) == 1:  # one storage for the five: views of a pinned block
            views += 1
    assert views == pinned_now == 2 * 2  # every pin is held by the patches kept; the other 32 were copied out
    assert len(mapped) <= 2 * (BLOCKS_PER_WORKER + 2)


def counting(pinned, counted: dict):
    def pinned_and_counted(*args):
        view = pinned(*args)
        counted["pinned" if view is not None else "copied"] += 1
        return view

    return pinned_and_counted


def test_a_queue_serves_most_patches_from_pinned_blocks_and_returns_them_as_batches_are_collated():
    data = [{"image": torch.rand(1, 24, 24, 24), "id": i} for i in range(8)]
    queue = PatchQueueDataset(data, UniformSamplerd("image", 8), max_length=16, samples_per_volume=4, num_workers=2)
    per_worker = pinned_blocks_per_worker(16, 4, num_workers=2)
    counted = {"pinned": 0, "copied": 0}
    with queue:
        for epoch in range(3):
            queue.set_epoch(epoch)
            ids = [int(i) for batch in DataLoader(queue, batch_size=4) for i in batch["id"]]
            assert sorted(ids) == sorted(list(range(8)) * 4)  # every subject gives its four patches
            pins = queue._background._pins
            if epoch == 0:
                pins.pinned = counting(pins.pinned, counted)
            assert pins.held <= 2 * per_worker
        mapped = [key for key in shared_blocks._mapped if key[0] == queue._background._returns_token]
    assert counted["pinned"] > 2 * counted["copied"]  # blocks come back as their patches are collated
    assert len(mapped) <= 2 * (BLOCKS_PER_WORKER + per_worker)  # no worker pool grew beyond its capacity


def test_the_server_copies_out_the_buffered_patches_of_older_pinned_blocks_and_serves_the_same_stream():
    planner = EpochPlanner([4] * 4, seed=0, shuffle_subjects=False)
    blocks = [torch.zeros(64, dtype=torch.uint8) for _ in range(4)]

    def pinned_results(token: int, pins: BlockPins):
        for task in planner.tasks(0):  # pinned as the server pulls them, as the unpacking thread does
            view = pins.pinned(BlockTicket(token, 0, task.subject), blocks[task.subject], 64)
            stacked = block_view(view, torch.float32, 0, (4, 1))
            stacked.copy_(10.0 * task.subject + torch.arange(4.0).unsqueeze(1))
            yield task, [{"x": patch, "subject": task.subject} for patch in stacked.unbind(0)]

    streams = {}
    with return_pipes(1) as (token, _):
        for copying in (True, False):
            pins = BlockPins(per_worker=4, kept=1)
            server = EpochServer(
                None, planner, seed=0, max_length=8, shuffle_patches=True, pins=pins if copying else None
            )
            server.probe.wants_slab = lambda: False  # patches served as they are, not laid out in slabs
            streams[copying] = [patch for chunk in server.slabs(0, pinned_results(token, pins)) for patch in chunk]
    copied, viewed = streams[True], streams[False]
    assert [float(p["x"]) for p in copied] == [float(p["x"]) for p in viewed]  # the same stream
    assert all(shares_memory(p["x"], blocks[p["subject"]]) for p in viewed)
    in_block = [shares_memory(p["x"], blocks[p["subject"]]) for p in copied]
    assert all(viewing for p, viewing in zip(copied, in_block) if p["subject"] == 3)  # the newest: never surplus
    assert not all(in_block) and sum(in_block) >= 4  # older subjects' buffered patches were copied out


def test_patches_served_from_pinned_blocks_keep_their_subjects_values_however_long_they_are_kept():
    from monai.data import ThreadDataLoader

    data = [{"image": torch.full((1, 16, 16, 16), float(i)), "id": i} for i in range(10)]
    queue = PatchQueueDataset(data, UniformSamplerd("image", 8), max_length=8, samples_per_volume=4, num_workers=2)
    with queue:
        kept = list(DataLoader(queue, batch_size=None))  # a whole epoch of patches held: most pins stay taken
        for _ in range(2):  # the workers go on writing other subjects into their blocks meanwhile
            for batch in ThreadDataLoader(queue, batch_size=4):
                assert all(torch.all(image == int(i)) for image, i in zip(batch["image"], batch["id"]))
        assert queue._background._pins.held <= 2 * pinned_blocks_per_worker(8, 4, num_workers=2)
    assert len(kept) == 40 and sorted(int(p["id"]) for p in kept) == sorted(list(range(10)) * 4)
    assert all(torch.all(patch["image"] == int(patch["id"])) for patch in kept)
