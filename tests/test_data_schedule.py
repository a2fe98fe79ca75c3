"""The queue's pure parts: epoch plans, rank shares, the patch buffer and the patch transport."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from monai.data import MetaTensor
from scipy.stats import chisquare
from torch.utils.data import DistributedSampler

from monai_patchqueue import UniformSamplerd
from monai_patchqueue.data.buffer import PatchBuffer
from monai_patchqueue.data.planner import EpochPlanner
from monai_patchqueue.data.schedule import SubjectTask, epoch_tasks, equalised_counts, rank_shares, subject_order
from monai_patchqueue.data.subject_patches import SubjectPatches
from monai_patchqueue.data.transport import PatchPack


@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**31), st.integers(0, 50))
def test_rank_shares_are_disjoint_cover_every_subject_and_differ_by_at_most_one(n, world, seed, epoch):
    if n < world:
        with pytest.raises(ValueError, match="at least one subject"):
            rank_shares(subject_order(n, seed, epoch, True), world)
        return
    shares = rank_shares(subject_order(n, seed, epoch, True), world)
    flat = [s for share in shares for s in share]
    assert sorted(flat) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@given(st.lists(st.integers(1, 9), min_size=1, max_size=8), st.integers(0, 30))
def test_equalised_counts_reach_the_target_and_never_lower_a_count(counts, extra):
    target = sum(counts) + extra
    out = equalised_counts(counts, target)
    assert sum(out) == target
    assert all(a >= b for a, b in zip(out, counts))
    assert max(a - b for a, b in zip(out, counts)) - min(a - b for a, b in zip(out, counts)) <= 1


def test_subject_order_is_seeded_differs_between_epochs_and_is_uniform():
    assert subject_order(10, 3, 0, True) == subject_order(10, 3, 0, True)
    assert subject_order(10, 3, 0, True) != subject_order(10, 3, 1, True)
    firsts = np.bincount([subject_order(5, 11, epoch, True)[0] for epoch in range(2000)], minlength=5)
    assert chisquare(firsts).pvalue > 1e-3


def test_epoch_tasks_have_distinct_seeds_that_depend_on_rank_and_epoch():
    tasks = epoch_tasks(list(range(50)), [2] * 50, seed=1, epoch=0, rank=0)
    assert len({task.seed for task in tasks}) == 50
    assert [t.seed for t in epoch_tasks([0], [1], 1, 0, 1)] != [t.seed for t in epoch_tasks([0], [1], 1, 0, 0)]
    assert [t.seed for t in epoch_tasks([0], [1], 1, 1, 0)] != [t.seed for t in epoch_tasks([0], [1], 1, 0, 0)]


def test_planner_equalises_ranks_with_a_distributed_sampler_and_reaches_set_epoch():
    counts = [2, 2, 2, 9, 2]
    samplers = [DistributedSampler(range(5), num_replicas=2, rank=rank, shuffle=True, seed=4) for rank in range(2)]
    planners = [EpochPlanner(counts, seed=0, shuffle_subjects=False, subject_sampler=s) for s in samplers]
    for epoch in range(3):
        plans = [planner.tasks(epoch) for planner in planners]
        assert samplers[0].epoch == epoch
        assert sum(t.count for t in plans[0]) == sum(t.count for t in plans[1])
        for rank, plan in enumerate(plans):
            samplers[rank].set_epoch(epoch)
            assert [t.subject for t in plan] == list(samplers[rank])
            assert all(t.count >= counts[t.subject] for t in plan)


def test_planner_rejects_a_subject_index_out_of_range():
    with pytest.raises(IndexError, match="subject index 7"):
        EpochPlanner([1, 1], seed=0, shuffle_subjects=False, subject_sampler=[0, 7]).tasks(0)


def test_buffer_pops_uniformly_at_random_and_fifo_without_rng():
    fifo = PatchBuffer(rng=None)
    fifo.extend(list(range(5)))
    assert [fifo.pop() for _ in range(5)] == list(range(5))
    rng = np.random.default_rng(0)
    first = []
    for _ in range(3000):
        buffer = PatchBuffer(rng)
        buffer.extend(list(range(6)))
        first.append(buffer.pop())
    assert chisquare(np.bincount(first, minlength=6)).pvalue > 1e-3
    with pytest.raises(IndexError):
        PatchBuffer(rng).pop()


def test_patch_pack_round_trip_keeps_data_meta_and_trace():
    image = MetaTensor(torch.arange(512.0).reshape(1, 8, 8, 8), affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))
    data = {"image": image, "name": "a", "extra": np.arange(3)}
    _, patches = SubjectPatches([data], UniformSamplerd("image", 4))[SubjectTask(0, 0, 0, 5, 9)]
    unpacked = pickle.loads(pickle.dumps(PatchPack(patches))).unpack()
    assert len(unpacked) == 5
    for before, after in zip(patches, unpacked):
        assert torch.equal(before["image"].as_tensor(), after["image"].as_tensor())
        assert torch.equal(before["image"].affine, after["image"].affine)
        assert torch.equal(before["location"], after["location"])
        assert before["image"].applied_operations == after["image"].applied_operations
        assert before["image"].meta.keys() == after["image"].meta.keys()
        assert after["name"] == "a" and "extra" not in after  # an array the sampler did not crop stays behind
    assert len({p["image"].untyped_storage().data_ptr() for p in unpacked}) == 1  # one shared storage


@pytest.mark.parametrize("key", ["image", "weights"])
def test_patch_pack_refuses_tensors_off_the_cpu_naming_the_key(key):
    # "meta" stands in for a GPU: any device but the CPU. `weights` differs in shape between the patches, so it
    # would travel pickled with the metadata rather than stacked: it is checked too, not moved to the CPU.
    patches = [{"image": torch.zeros(1, 2, 2), "weights": torch.zeros(i + 1), "id": i} for i in range(3)]
    for patch in patches:
        patch[key] = patch[key].to("meta")
    with pytest.raises(ValueError, match=rf"`{key}` of the patches is on meta.*num_workers=0"):
        PatchPack(patches)


def test_patch_pack_sends_the_header_once_and_collates_as_monai_does():
    from monai.data import list_data_collate

    header = {"dim": np.array([3, 8, 8, 8]), "scl_slope": np.float32("nan"), "intent_name": np.array("x"), "n": 3}
    image = MetaTensor(torch.rand(1, 8, 8, 8), meta=header)
    _, patches = SubjectPatches([{"image": image}], UniformSamplerd("image", 4))[SubjectTask(0, 0, 0, 4, 1)]
    pack = PatchPack(patches)
    _, traces, _ = pickle.loads(pack.metadata)
    shared, own, _ = traces["image"]
    assert {"dim", "scl_slope", "intent_name", "n"} <= shared.keys()  # NaN == NaN for the header: sent once
    assert all("scl_slope" not in meta for meta in own)
    unpacked = pack.unpack()
    assert isinstance(unpacked[0]["image"].meta["dim"], torch.Tensor)  # numeric header values: tensors
    assert isinstance(unpacked[0]["image"].meta["intent_name"], np.ndarray)  # strings stay NumPy
    for patch in (*patches, *unpacked):
        del patch["image"].meta["intent_name"]  # which no collation takes
    ours = list_data_collate([{"image": p["image"]} for p in unpacked])["image"].meta
    monai = list_data_collate([{"image": p["image"]} for p in patches])["image"].meta
    for key in ("dim", "scl_slope", "n", "affine"):
        torch.testing.assert_close(ours[key], monai[key], equal_nan=True)
        assert ours[key].dtype == monai[key].dtype and ours[key].shape == monai[key].shape


def test_patch_pack_sends_once_only_header_values_every_patch_holds_alike():
    def patch(**header):
        return {"image": MetaTensor(torch.zeros(1, 2, 2), meta=header)}

    same = np.array([1.0, np.nan])
    patches = [
        patch(kept=same.copy(), gone=np.array(1), value=np.array([1, 2]), kind=np.uint8([1]), shape=np.array([1, 2])),
        patch(kept=same.copy(), gone=np.array(1), value=np.array([1, 3]), kind=np.uint8([1]), shape=np.array([1, 2])),
        patch(kept=same.copy(), value=np.array([1, 2]), kind=np.int8([1]), shape=np.array([[1, 2]])),
    ]
    pack = PatchPack(patches)
    shared, _, _ = pickle.loads(pack.metadata)[1]["image"]
    assert "kept" in shared  # equal bytes in every patch, NaN included
    # missing once, a different value, the same bytes as another dtype or shape
    assert not {"gone", "value", "kind", "shape"} & shared.keys()
    for before, after in zip(patches, pack.unpack()):
        for key, value in before["image"].meta.items():
            if isinstance(value, np.ndarray):  # numeric header values shared by the patches arrive as tensors
                got = np.asarray(after["image"].meta[key])
                np.testing.assert_array_equal(got, value)
                assert got.dtype == value.dtype and got.shape == value.shape
        assert ("gone" in after["image"].meta) == ("gone" in before["image"].meta)


def test_patch_pack_keeps_patches_with_different_keys():
    patches = [{"image": torch.zeros(2)}, {"image": torch.ones(2), "more": 1}]
    unpacked = PatchPack(patches).unpack()
    assert unpacked[1]["more"] == 1 and "more" not in unpacked[0]
    assert torch.equal(unpacked[1]["image"], torch.ones(2))
