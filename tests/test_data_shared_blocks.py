"""Workers' reusable shared-memory blocks: patches cross in them, are copied out (or served as views, see
test_data_block_pins.py), and the blocks come back."""

from __future__ import annotations

import contextlib
import pickle

import pytest
import torch

from monai_patchqueue import UniformSamplerd
from monai_patchqueue.data import shared_blocks
from monai_patchqueue.data.background import (
    BLOCKS_PER_WORKER,
    BackgroundTasks,
    memory_outside_buffer,
    patches_in_slabs,
)
from monai_patchqueue.data.block_pins import pinned_blocks_per_worker
from monai_patchqueue.data.planner import EpochPlanner
from monai_patchqueue.data.shared_blocks import BlockTicket, SharedBlocks, close_returns, mapped_block, open_returns
from monai_patchqueue.data.subject_patches import SubjectPatches, patch_nbytes
from monai_patchqueue.data.transport import PatchPack


def _subjects(count: int) -> list[dict]:
    return [{"image": torch.full((1, 8, 8, 8), float(i)), "label": torch.full((1, 8, 8, 8), i, dtype=torch.uint8)}
            for i in range(count)]  # fmt: skip


def test_patches_held_across_many_subjects_keep_their_values_while_workers_reuse_few_blocks():
    subjects = _subjects(12)
    work = SubjectPatches(subjects, UniformSamplerd(["image", "label"], 4))
    background = BackgroundTasks(work, EpochPlanner([5] * 12, seed=0, shuffle_subjects=True), num_workers=2)
    token = background._returns_token
    try:
        held = [(task.subject, patches) for _, (task, patches) in zip(range(36), background.results(epoch=0))]
        mapped = [block for key, block in shared_blocks._mapped.items() if key[0] == token]
    finally:
        background.close()
    assert len(held) == 36  # three epochs
    for subject, patches in held:  # a reused block would have overwritten earlier subjects' patches
        assert len(patches) == 5
        for patch in patches:
            assert torch.all(patch["image"] == subject) and torch.all(patch["label"] == subject)
            assert not patch["image"].untyped_storage().is_shared()
            assert patch["image"].untyped_storage().nbytes() == patch["image"].numel() * 4  # its own copy
    assert 1 <= len(mapped) <= 2 * BLOCKS_PER_WORKER  # 36 subjects went through a handful of blocks
    # each block is as large as memory_outside_buffer (and so get_max_memory) counts it
    outside_pools = (patches_in_slabs(16) + 5) * patch_nbytes(held[0][1][0])  # two slabs, one subject unpacking
    pool = memory_outside_buffer(2, held[0][1][0], 5, max_length=16) - outside_pools
    blocks_per_worker = BLOCKS_PER_WORKER + pinned_blocks_per_worker(16, 5, num_workers=2)  # in flight, pinned
    assert all(block.numel() == pool // (2 * blocks_per_worker) for block in mapped)
    assert not [key for key in shared_blocks._mapped if key[0] == token]  # unmapped at close


@contextlib.contextmanager
def one_worker_blocks(capacity: int):
    """Yield ``(return pipe, blocks, take)`` for worker 0 of a fresh set of return pipes: ``take`` is what a
    worker passes to :class:`PatchPack`."""
    token, pipes = open_returns(1)
    blocks = SharedBlocks(pipes[0], capacity=capacity)

    def take(nbytes):
        block, index = blocks.take(nbytes)
        return block, BlockTicket(token, 0, index, mapped=blocks.mapped_there(index))

    try:
        yield pipes[0], blocks, take
    finally:
        close_returns(token)


def test_a_pack_dropped_unread_returns_its_block_and_an_unpacked_one_returns_it_once():
    with one_worker_blocks(capacity=2) as (pipe, blocks, take):
        patches = [{"image": torch.full((1, 2, 2), float(i))} for i in range(3)]
        sent = PatchPack(patches, take)
        dropped = pickle.loads(pickle.dumps(sent))  # as received from a worker
        del sent  # the sender's copy returns nothing
        assert pipe.empty()
        del dropped
        assert not pipe.empty()
        received = pickle.loads(pickle.dumps(PatchPack(patches, take)))
        assert received.ticket.block == 0  # block 0 came back and was reused
        unpacked = received.unpack()
        with pytest.raises(RuntimeError, match="unpacked already"):
            received.unpack()  # its block may hold another subject's patches by now
        del received  # returned at unpack, not again when collected
        assert blocks.take(1)[1] == 0 and pipe.empty()
        assert [float(p["image"].sum()) for p in unpacked] == [0.0, 4.0, 8.0]


def test_a_worker_with_every_block_out_takes_a_one_off_block_and_grows_a_freed_block_that_is_too_small():
    with one_worker_blocks(capacity=1) as (pipe, blocks, _):
        small, index = blocks.take(10)
        assert index == 0 and small.numel() == 2**20  # rounded up to a whole MiB
        assert blocks.take(10)[1] is None
        pipe.put(0)
        large, index = blocks.take(3 * 2**20 + 1)
        assert index == 0 and large.numel() == 4 * 2**20


def test_received_patches_are_copied_out_of_the_block_whatever_their_dtype():
    with one_worker_blocks(capacity=1) as (_, _, take):
        patches = [{"image": torch.rand(1, 4, 4), "probabilities": torch.rand(2, 4, 4).to(torch.bfloat16)}
                   for _ in range(3)]  # fmt: skip
        received = pickle.loads(pickle.dumps(PatchPack(patches, take)))
        block = received.block
        unpacked = received.unpack()
        block.fill_(255)  # the worker writes its next subject into the block
        for sent, got in zip(patches, unpacked):
            for key in ("image", "probabilities"):
                assert got[key].dtype == sent[key].dtype and torch.equal(got[key], sent[key])
                assert not got[key].untyped_storage().is_shared()


def test_a_block_that_came_back_travels_as_its_ticket_alone_and_unpacks_to_the_patches_written_into_it():
    with one_worker_blocks(capacity=1) as (_, blocks, take):
        first = [{"image": torch.full((1, 64, 64), float(i))} for i in range(4)]  # 64 KiB of patches
        sent = PatchPack(first, take)
        assert not sent.ticket.mapped
        assert len(pickle.dumps(sent)) > 64 * 1024  # the block goes along (here by value; by fd between processes)
        pickle.loads(pickle.dumps(sent)).unpack()  # the training process returns the block and keeps it mapped
        second = [{"image": torch.full((1, 64, 64), 10.0 + i)} for i in range(4)]
        sent = PatchPack(second, take)
        assert sent.ticket.mapped and sent.block.data_ptr() == blocks._blocks[0].data_ptr()
        message = pickle.dumps(sent)
        assert len(message) < 4 * 1024  # the ticket and the metadata only
        received = pickle.loads(message)
        assert received.block is mapped_block(received.ticket)
        received.block.copy_(sent.block)  # what the shared memory would show: the worker wrote the new patches
        assert [float(p["image"][0, 0, 0]) for p in received.unpack()] == [10.0, 11.0, 12.0, 13.0]


def test_a_ticket_whose_block_is_not_mapped_here_raises_naming_the_worker_and_a_replaced_block_is_sent_again():
    with one_worker_blocks(capacity=1) as (pipe, blocks, _):
        with pytest.raises(RuntimeError, match="block 0 of worker 0 is not mapped"):
            mapped_block(BlockTicket(-1, 0, 0, mapped=True))
        blocks.take(10)
        pipe.put(0)
        blocks.take(10)
        assert blocks.mapped_there(0)
        pipe.put(0)
        blocks.take(2 * 2**20)  # too small: replaced by a new block, which the training process has not seen
        assert not blocks.mapped_there(0)


def test_workers_pass_each_block_to_the_training_process_once_however_many_subjects_it_carries(monkeypatch):
    from torch.multiprocessing import reductions

    subjects = _subjects(12)
    work = SubjectPatches(subjects, UniformSamplerd(["image", "label"], 4))
    background = BackgroundTasks(work, EpochPlanner([5] * 12, seed=0, shuffle_subjects=True), num_workers=2)
    passed = []
    try:
        results = background.results(epoch=0)
        held = [next(results)]  # the workers are running: count from here on, in this process only
        for name in ("rebuild_storage_fd", "rebuild_storage_filename"):  # the two CPU sharing strategies
            original = getattr(reductions, name)
            monkeypatch.setattr(reductions, name, lambda *args, original=original: passed.append(1) or original(*args))
        held += [next(results) for _ in range(47)]
    finally:
        background.close()
    for task, patches in held:
        assert all(torch.all(patch["image"] == task.subject) for patch in patches)
    assert len(passed) <= 2 * BLOCKS_PER_WORKER  # 47 subjects: each block passed once (some before counting)


def test_a_block_that_shared_memory_cannot_hold_raises_saying_how_much_and_what_to_do(monkeypatch):
    def full(size):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1>: No space left on device (28)")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", full)
    with one_worker_blocks(capacity=1) as (_, blocks, _):
        with pytest.raises(RuntimeError, match=r"3 MiB shared-memory block .*No space left.*--shm-size"):
            blocks.take(2 * 2**20 + 1)
