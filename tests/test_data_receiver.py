"""The receiver serves the workers' patches in a thread of the training process, in order, a bounded way ahead."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from monai_patchqueue import PatchQueueDataset, UniformSamplerd
from monai_patchqueue.data import background, slabs, transport
from monai_patchqueue.data.receiver import Receiver


def _items(count: int, failing: int | None = None):
    for index in range(count):
        if index == failing:
            raise ValueError(f"subject {index} failed")
        yield index


def test_items_arrive_in_order_and_a_failure_in_its_place():
    receiver = Receiver(_items(6, failing=3), ahead=2)
    try:
        assert [receiver.next() for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="subject 3 failed"):
            receiver.next()
    finally:
        receiver.stop()


def test_the_end_of_the_items_reaches_the_consumer():
    receiver = Receiver(_items(2), ahead=1)
    try:
        assert [receiver.next(), receiver.next()] == [0, 1]
        with pytest.raises(StopIteration):
            receiver.next()
    finally:
        receiver.stop()


def test_the_receiver_makes_items_only_while_fewer_than_ahead_wait_and_stops_when_asked():
    pulled = []

    def items():
        for index in range(100):
            pulled.append(index)
            yield index

    receiver = Receiver(items(), ahead=2)
    time.sleep(0.3)
    assert len(pulled) == 2  # two waiting
    assert receiver.next() == 0
    time.sleep(0.3)
    assert len(pulled) == 3  # the taken one replaced
    receiver.stop()  # returns although the receiver was waiting for room
    assert len(pulled) == 3


def _recording(monkeypatch, owner, name: str) -> list[str]:
    threads = []
    original = getattr(owner, name)

    def recording(self, *args):
        threads.append(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(owner, name, recording)
    return threads


def test_with_workers_patches_are_unpacked_and_laid_out_off_the_training_thread_a_bounded_way_ahead(monkeypatch):
    unpacks = _recording(monkeypatch, transport.PatchPack, "unpack")
    layouts = _recording(monkeypatch, slabs.PatchSlab, "served")
    data = [{"image": torch.full((1, 8, 8, 8), float(i))} for i in range(12)]
    with PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, num_workers=2, seed=0) as queue:
        patches = iter(queue)
        first = next(patches)  # slab 0 (4 patches: max_length) is served, slab 1 filled ahead
        time.sleep(1.0)  # the workers are done with several more subjects by now
        # slab 0 admitted subjects 0-2, slab 1 subjects 3 and 4 (buffer of 4, 2 patches each, admitted when they
        # fit), and one more subject is unpacked ahead
        assert (len(unpacks), len(layouts)) == (5 + background.SUBJECTS_UNPACKED_AHEAD, 2)
        rest = list(patches)
    assert len(rest) + 1 == 24 and first["image"].shape == (1, 4, 4, 4)
    assert 12 <= len(unpacks) <= 12 + 3 + background.SUBJECTS_UNPACKED_AHEAD  # it may fill the next epoch's first slab
    assert set(unpacks) == {"PatchQueueDataset unpacker"} and set(layouts) == {"PatchQueueDataset receiver"}


def test_without_workers_nothing_runs_in_a_thread(monkeypatch):
    unpacks = _recording(monkeypatch, transport.PatchPack, "unpack")
    layouts = _recording(monkeypatch, slabs.PatchSlab, "served")
    data = [{"image": torch.zeros(1, 8, 8, 8)}] * 3
    with PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, seed=0) as queue:
        assert len(list(queue)) == 6
    assert unpacks == []  # patches made in this process are not packed at all
    assert set(layouts) == {threading.current_thread().name}


def test_closing_the_queue_mid_epoch_ends_its_serving_thread_at_once():
    # the unpacking thread may wait for a result that never comes (until its next poll); the serving thread
    # waiting on it must not keep running Python code after close()
    data = [{"image": torch.full((1, 8, 8, 8), float(i))} for i in range(12)]
    queue = PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, num_workers=2, seed=0)
    next(iter(queue))
    start = time.monotonic()
    queue.close()
    assert time.monotonic() - start < 5
    serving = [thread for thread in threading.enumerate() if thread.name == "PatchQueueDataset receiver"]
    assert not any(thread.is_alive() for thread in serving)


def test_next_on_a_stopped_receiver_raises_instead_of_waiting_forever():
    receiver = Receiver(iter(lambda: time.sleep(10), None), ahead=1)  # an item that takes long to come
    receiver.stop(wait=False)
    with pytest.raises(RuntimeError, match="stopped"):
        receiver.next()


def test_closing_waits_for_the_subject_being_unpacked_and_none_is_unpacked_after(monkeypatch):
    # a daemon thread still in torch's C++ code when the interpreter exits aborts the process: once close()
    # returns, the unpacking thread must be done with torch
    unpacks: list[tuple[float, float]] = []
    unpack = transport.PatchPack.unpack

    def slow_unpack(pack, pins=None):
        start = time.monotonic()
        time.sleep(0.2)
        patches = unpack(pack, pins)
        unpacks.append((start, time.monotonic()))
        return patches

    monkeypatch.setattr(transport.PatchPack, "unpack", slow_unpack)
    data = [{"image": torch.full((1, 8, 8, 8), float(i))} for i in range(12)]
    queue = PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, num_workers=2, seed=0)
    next(iter(queue))
    time.sleep(0.1)  # the unpacking thread is now unpacking the next subject
    queue.close()
    closed = time.monotonic()
    time.sleep(0.5)
    assert len(unpacks) >= 2
    assert all(end <= closed for _, end in unpacks)


def test_queues_left_open_are_closed_at_exit():
    earlier = set(threading.enumerate())
    data = [{"image": torch.full((1, 8, 8, 8), float(i))} for i in range(12)]
    queue = PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, num_workers=2, seed=0)
    next(iter(queue))
    pids = queue.worker_pids
    assert len(pids) == 2 and queue._background in background._OPEN
    background._close_open_backgrounds()  # what the interpreter runs at exit
    assert queue.worker_pids == [] and not background._OPEN
    serving = [thread for thread in set(threading.enumerate()) - earlier if thread.name == "PatchQueueDataset receiver"]
    assert serving == []


def test_the_unpacking_thread_ends_soon_after_close():
    # it waits for the workers' next result in slices of RESULT_POLL_S, and ends once the queue is closed
    earlier = set(threading.enumerate())
    data = [{"image": torch.full((1, 8, 8, 8), float(i))} for i in range(12)]
    queue = PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, num_workers=2, seed=0)
    next(iter(queue))
    ours = [thread for thread in set(threading.enumerate()) - earlier if thread.name.startswith("PatchQueueDataset")]
    assert sorted(thread.name for thread in ours) == ["PatchQueueDataset receiver", "PatchQueueDataset unpacker"]
    queue.close()
    for thread in ours:
        thread.join(timeout=background.RESULT_POLL_S + 2)
    assert not any(thread.is_alive() for thread in ours)
