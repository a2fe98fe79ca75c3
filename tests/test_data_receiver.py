"""The receiver unpacks the workers' results in a thread of the training process, in order, a bounded way ahead."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from monai_patchqueue import PatchQueueDataset, UniformSamplerd
from monai_patchqueue.data import transport
from monai_patchqueue.data.background import RECEIVED_AHEAD
from monai_patchqueue.data.receiver import Receiver
from monai_patchqueue.data.transport import PatchPack


def _results(count: int, failing: int | None = None):
    for index in range(count):
        if index == failing:
            raise ValueError(f"subject {index} failed")
        yield index, PatchPack([{"value": torch.tensor(index)}])


def test_results_arrive_in_order_and_a_failure_in_its_place():
    receiver = Receiver(_results(6, failing=3), ahead=2)
    try:
        assert [receiver.next()[0] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="subject 3 failed"):
            receiver.next()
    finally:
        receiver.stop()


def test_the_receiver_waits_when_the_consumer_does_not_take_and_stops_when_asked():
    pulled = []

    def results():
        for index in range(100):
            pulled.append(index)
            yield index, PatchPack([{"value": torch.tensor(index)}])

    receiver = Receiver(results(), ahead=2)
    time.sleep(0.3)
    assert len(pulled) == 3  # two waiting, one in hand
    receiver.stop()  # returns although the receiver was waiting to hand a result over
    assert len(pulled) == 3


def _counting_unpacks(monkeypatch) -> list[str]:
    threads = []
    unpack = PatchPack.unpack

    def recording_unpack(self):
        threads.append(threading.current_thread().name)
        return unpack(self)

    monkeypatch.setattr(transport.PatchPack, "unpack", recording_unpack)
    return threads


def test_with_workers_received_patches_are_unpacked_off_the_training_thread_and_a_bounded_way_ahead(monkeypatch):
    threads = _counting_unpacks(monkeypatch)
    data = [{"image": torch.full((1, 8, 8, 8), float(i))} for i in range(12)]
    with PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, num_workers=2, seed=0) as queue:
        patches = iter(queue)
        first = next(patches)  # the buffer admitted two subjects (4 patches)
        time.sleep(1.0)  # the workers are done with several more subjects by now
        assert len(threads) == 2 + RECEIVED_AHEAD + 1
        rest = list(patches)
    assert len(rest) + 1 == 24 and first["image"].shape == (1, 4, 4, 4)
    assert 12 <= len(threads) <= 12 + RECEIVED_AHEAD + 1  # it may have received the next epoch's first ones
    assert set(threads) == {"PatchQueueDataset receiver"}


def test_without_workers_nothing_runs_in_a_thread(monkeypatch):
    threads = _counting_unpacks(monkeypatch)
    data = [{"image": torch.zeros(1, 8, 8, 8)}] * 3
    with PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, seed=0) as queue:
        assert len(list(queue)) == 6
    assert threads == []  # patches made in this process are not packed at all
