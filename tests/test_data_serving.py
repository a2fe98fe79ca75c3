"""Tests of the queue's epoch serving: chunks and slabs of popped patches (monai_patchqueue.data.serving)."""

from __future__ import annotations

import pytest
import torch

from monai_patchqueue.data.planner import EpochPlanner
from monai_patchqueue.data.serving import EpochServer, PatchChunk
from monai_patchqueue.data.slabs import PatchSlab


def _server(counts: list[int], max_length: int, slabs: bool) -> tuple[EpochServer, list]:
    planner = EpochPlanner(counts, seed=0, shuffle_subjects=False)
    results = [(task, [{"x": torch.tensor(float(i))}] * task.count) for i, task in enumerate(planner.tasks(0))]
    server = EpochServer(None, planner, seed=0, max_length=max_length, shuffle_patches=False)
    server.probe.wants_slab = lambda: slabs  # chunks (as for MONAI's loaders) or slabs (torch's default_collate)
    return server, results


def test_a_served_chunk_hands_over_its_patches():
    chunk = PatchChunk(2)
    chunk.add({"x": 0})
    chunk.add({"x": 1})
    served = chunk.served()
    assert [patch["x"] for patch in served] == [0, 1]
    assert len(chunk) == 0  # as a slab: served once, never again


@pytest.mark.parametrize("slabs", [False, True], ids=["chunks", "slabs"])
def test_closing_an_epoch_after_a_full_chunk_serves_nothing_more(slabs):
    server, results = _server([4, 4, 4], max_length=4, slabs=slabs)
    epoch = server.slabs(0, iter(results))
    first = next(epoch)
    assert [float(patch["x"]) for patch in first] == [0.0] * 4
    epoch.close()  # a consumer that abandons the epoch: no chunk may be yielded while it closes


def _failing_after(results: list, count: int, error: BaseException):
    yield from results[:count]
    raise error


@pytest.mark.parametrize("slabs", [False, True], ids=["chunks", "slabs"])
def test_a_failure_comes_after_the_patches_popped_before_it(slabs):
    server, results = _server([4, 4, 4], max_length=8, slabs=slabs)  # slabs of 8; subject 2 enters at 4 popped
    epoch = server.slabs(0, _failing_after(results, 2, OSError("disk gone")))
    assert [float(patch["x"]) for patch in next(epoch)] == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(Exception, match="disk gone"):
        next(epoch)


@pytest.mark.parametrize("slabs", [False, True], ids=["chunks", "slabs"])
def test_an_interrupt_ends_the_epoch_at_once(slabs):
    server, results = _server([4, 4, 4], max_length=8, slabs=slabs)
    epoch = server.slabs(0, _failing_after(results, 2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        next(epoch)  # not the 4 patches popped before it first: the user asked to stop


def test_a_slab_after_serving_holds_no_patches():
    slab = PatchSlab(capacity=1)
    slab.add({"x": torch.zeros(2)})
    slab.served()
    assert len(slab) == 0
