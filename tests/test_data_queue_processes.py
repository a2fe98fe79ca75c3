"""PatchQueueDataset across processes: failures, killed workers, shutdown, outer workers, DDP, bundle configs."""

from __future__ import annotations

import collections
import datetime
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.bundle import ConfigParser
from monai.data import ThreadDataLoader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from torch.utils.data import DataLoader

from monai_patchqueue import PatchQueueDataset, SubjectError, UniformSamplerd

pytestmark = pytest.mark.timeout(120)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited but is not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_until_gone(pids: list[int], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def nifti_subjects(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("subjects")
    data = []
    for index in range(4):
        path = folder / f"image_{index}.nii.gz"
        nib.save(nib.Nifti1Image(np.full((10, 10, 10), index, np.float32), np.eye(4)), path)
        data.append({"image": str(path), "id": index})
    return data


LOAD = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])


def nifti_queue(data: list[dict], **kwargs) -> PatchQueueDataset:
    kwargs.setdefault("seed", 0)
    return PatchQueueDataset(data, UniformSamplerd("image", 4, num_samples=2), 4, 2, transform=LOAD, **kwargs)


# --- failures --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_missing_file_raises_in_the_loop_naming_the_subject_and_file(nifti_subjects, num_workers):
    data = [*nifti_subjects, {"image": "/nowhere/missing_brain.nii.gz", "id": 9}]
    with nifti_queue(data, num_workers=num_workers, shuffle_subjects=False) as queue:
        start = time.monotonic()
        with pytest.raises(SubjectError, match=r"subject 4 \{'image': '/nowhere/missing_brain.nii.gz'\}"):
            for _ in DataLoader(queue, batch_size=2):
                pass
        assert time.monotonic() - start < 30
        # the next epoch starts afresh and fails again at the same subject, not earlier and without hanging
        served = 0
        with pytest.raises(SubjectError, match="missing_brain"):
            for _ in queue:
                served += 1
        assert served >= 4


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_failure_monais_thread_loader_does_not_pass_on_is_raised_by_the_next_iteration(
    nifti_subjects, num_workers, monkeypatch
):
    died_of = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died_of.append(args.exc_value))
    data = [*nifti_subjects, {"image": "/nowhere/missing_brain.nii.gz", "id": 9}]
    with nifti_queue(data, num_workers=num_workers, shuffle_subjects=False) as queue:
        served = sum(len(batch["id"]) for batch in ThreadDataLoader(queue, batch_size=2))
        assert served < len(queue)  # MONAI's loader ended the epoch early: its thread died of the failure
        assert [type(error) for error in died_of] == [SubjectError]
        with pytest.raises(SubjectError, match=r"(?s)epoch 0 stopped early .*subject 4 .*missing_brain") as raised:
            next(iter(ThreadDataLoader(queue, batch_size=2)))
        assert raised.value.__cause__ is died_of[0]
        # raised once: the next epoch runs again (and meets the missing file in the loader's thread again)
        assert sum(len(batch["id"]) for batch in ThreadDataLoader(queue, batch_size=2)) < len(queue)
        assert len(died_of) == 2
        with pytest.raises(SubjectError, match=r"(?s)epoch 1 stopped early .*missing_brain"):
            queue.close()  # the last epoch's failure, which no iteration raised, is raised once the workers stop
        assert queue.worker_pids == []
        queue.close()  # once


@pytest.mark.parametrize("block_raises", [False, True])
def test_leaving_the_with_block_raises_a_failure_the_last_epoch_left_unraised(
    nifti_subjects, monkeypatch, block_raises
):
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    data = [*nifti_subjects, {"image": "/nowhere/missing_brain.nii.gz", "id": 9}]
    expected = (ZeroDivisionError, "the block's own") if block_raises else (SubjectError, "missing_brain")
    with pytest.raises(expected[0], match=expected[1]):
        with nifti_queue(data, num_workers=2) as queue:
            for _ in ThreadDataLoader(queue, batch_size=2):  # a plain loop: its only epoch ends short
                pass
            if block_raises:
                raise ZeroDivisionError("the block's own error goes on")
    assert queue.worker_pids == []


def test_monais_trainer_reading_through_thread_loader_stops_at_a_failing_subject(nifti_subjects, monkeypatch):
    from monai.engines import SupervisedTrainer

    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the loader's thread prints what it died of
    data = [*nifti_subjects, {"image": "/nowhere/missing_brain.nii.gz", "id": 9}]
    network = torch.nn.Conv3d(1, 1, 1)
    with nifti_queue(data, num_workers=2) as queue:
        trainer = SupervisedTrainer(
            device="cpu",
            max_epochs=1,  # the only epoch is the last: ignite restarts the loader when it ends short
            train_data_loader=ThreadDataLoader(queue, batch_size=2),
            network=network,
            optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
            loss_function=torch.nn.L1Loss(),
            prepare_batch=lambda batch, device, non_blocking, **kwargs: (batch["image"], batch["image"]),
        )
        with pytest.raises(SubjectError, match="missing_brain"):
            trainer.run()


def test_an_iteration_stopped_by_close_in_a_loader_thread_is_no_failure_of_the_next(nifti_subjects, monkeypatch):
    died_of = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died_of.append(args.exc_value))
    with nifti_queue(nifti_subjects, num_workers=2) as queue:
        loader = ThreadDataLoader(queue, batch_size=2)
        batches = iter(loader)
        next(batches)  # the loader's thread goes on fetching
        queue.close()  # e.g. early stopping: the iteration in the loader's thread ends with an error
        for _ in batches:
            pass
        assert sum(len(batch["id"]) for batch in loader) == len(queue)  # nothing to report from the last one
    assert all("was stopped" in str(error) for error in died_of)


def test_a_failure_the_loop_saw_is_not_raised_again(nifti_subjects):
    data = [*nifti_subjects, {"image": "/nowhere/missing_brain.nii.gz", "id": 9}]
    with nifti_queue(data, shuffle_subjects=False) as queue:
        with pytest.raises(SubjectError, match="missing_brain"):
            list(DataLoader(queue, batch_size=2))
        first = next(iter(DataLoader(queue, batch_size=2)))  # the next epoch starts with patches
        assert len(first["id"]) == 2


def _to_meta_device(patch: dict) -> dict:
    return {**patch, "image": patch["image"].to("meta")}  # "meta" stands in for a GPU


def test_patches_a_worker_put_on_another_device_raise_naming_the_subject_and_the_way_out(nifti_subjects):
    with nifti_queue(nifti_subjects, patch_transform=_to_meta_device, num_workers=1) as queue:
        with pytest.raises(RuntimeError, match=r"(?s)subject \d .*`image` of the patches is on meta.*num_workers=0"):
            list(queue)


def test_a_killed_worker_raises_instead_of_hanging(nifti_subjects):
    slow = Compose([LOAD, lambda d: (time.sleep(0.2), d)[1]])
    queue = PatchQueueDataset(nifti_subjects * 4, UniformSamplerd("image", 4, num_samples=2), 4, 2, transform=slow,
                              num_workers=2, seed=0)  # fmt: skip
    iterator = iter(queue)
    next(iterator)
    os.kill(queue.worker_pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited unexpectedly|killed by signal"):
        for _ in iterator:
            pass
    assert time.monotonic() - start < 60
    queue.close()


def test_monais_thread_loader_reseeding_the_queue_restarts_its_workers_from_the_building_thread(monkeypatch):
    """A worker forked from a thread other than the main one allocates from that thread's glibc arena, whose
    64 MiB heaps send every larger allocation (a 4-channel volume) to a fresh mapping for every subject; MONAI's
    ThreadDataLoader reseeds a seedless queue when it is built, and iterates it in a thread of its own."""
    forking_threads = []
    fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forking_threads.append(threading.current_thread().name) or fork())
    data = [{"image": torch.rand(1, 8, 8, 8)} for _ in range(3)]
    with PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, num_workers=1) as queue:
        first_workers = queue.worker_pids
        loader = ThreadDataLoader(queue, batch_size=2)  # reseeds the queue: workers restarted here, at once
        restarted = queue.worker_pids
        assert restarted and restarted != first_workers
        assert sum(1 for batch in loader for _ in batch["image"]) == 6
        assert queue.worker_pids == restarted  # the loader's thread started none
    assert forking_threads and set(forking_threads) == {threading.main_thread().name}


def test_iterating_in_outer_dataloader_workers_raises_a_clear_error(nifti_subjects):
    with nifti_queue(nifti_subjects) as queue, pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(DataLoader(queue, batch_size=2, num_workers=2)))


# --- shutdown --------------------------------------------------------------------------------------------------


def started_queue(data: list[dict]) -> tuple[PatchQueueDataset, list[int]]:
    queue = nifti_queue(data, num_workers=2)
    deadline = time.monotonic() + 10
    while len(queue.worker_pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(queue.worker_pids) == 2, "start_background should start the workers at construction"
    return queue, queue.worker_pids


def test_an_iteration_overtaken_by_a_newer_one_raises_and_the_newer_one_is_whole(nifti_subjects):
    with nifti_queue(nifti_subjects, num_workers=2) as queue:
        loader = DataLoader(queue, batch_size=2)
        older = iter(loader)
        next(older)
        newer = iter(loader)
        assert len(next(newer)["image"]) == 2
        with pytest.raises(RuntimeError, match="a newer iteration of it started"):
            list(older)
        assert 2 + sum(len(batch["image"]) for batch in newer) == len(queue)


def test_close_context_exit_and_garbage_collection_stop_the_workers(nifti_subjects):
    queue, pids = started_queue(nifti_subjects)
    list(queue)
    queue.close()
    assert wait_until_gone(pids) and queue.worker_pids == []
    with started_queue(nifti_subjects)[0] as queue:
        pids = queue.worker_pids
        next(iter(queue))
    assert wait_until_gone(pids)
    queue, pids = started_queue(nifti_subjects)
    del queue
    gc.collect()
    assert wait_until_gone(pids)


def test_keyboard_interrupt_in_the_loop_leaves_no_workers(nifti_subjects):
    queue, pids = started_queue(nifti_subjects)
    with pytest.raises(KeyboardInterrupt), queue:
        for index, _ in enumerate(queue):
            if index == 3:
                raise KeyboardInterrupt
    assert wait_until_gone(pids)


def test_a_script_that_never_closes_its_queue_leaves_no_orphans(nifti_subjects, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(f"""
        import json
        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
        from monai_patchqueue import PatchQueueDataset, UniformSamplerd
        load = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])
        queue = PatchQueueDataset({json.dumps(nifti_subjects)}, UniformSamplerd("image", 4), 4, 2,
                                  transform=load, num_workers=2, seed=0)
        for epoch in range(2):
            count = sum(1 for _ in queue)
        print(json.dumps({{"pids": queue.worker_pids, "count": count}}))
    """)
    )
    # the script ends while the queue's threads work on the next epoch: they must not abort the exit
    # -X faulthandler: an abort prints every thread's Python stack into the failure message
    command = [sys.executable, "-X", "faulthandler", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["count"] == 8 and len(report["pids"]) == 2
    assert wait_until_gone(report["pids"])


_START_METHOD_SCRIPT = """
import json, sys
import torch
import torch.multiprocessing as mp
from monai_patchqueue import PatchQueueDataset, UniformSamplerd

def stream(num_workers):
    data = [{"image": torch.full((1, 12, 12, 12), float(i))} for i in range(5)]
    with PatchQueueDataset(data, UniformSamplerd("image", 6), 8, 3, num_workers=num_workers, seed=4) as queue:
        return [[int(p["image"][0, 0, 0, 0]), p["location"].tolist()] for _ in range(2) for p in queue]

def kinds(num_workers):
    from monai.data import MetaTensor
    data = [{"image": MetaTensor(torch.zeros(1, 12, 12, 12))} for i in range(2)]
    with PatchQueueDataset(data, UniformSamplerd("image", 6), 4, 2, num_workers=num_workers, seed=4) as queue:
        return sorted({type(p["image"]).__name__ for p in queue})

if __name__ == "__main__":  # spawned and forkserver children import this file again
    from monai.data import set_track_meta
    mp.set_start_method(sys.argv[1], force=True)
    report = {"in_process": stream(0), "workers": stream(2)}
    set_track_meta(False)  # a global of the training process: the workers do not inherit it
    report["untracked"] = {"in_process": kinds(0), "workers": kinds(1)}
    print(json.dumps(report))
"""


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_workers_started_by_spawn_or_forkserver_serve_the_same_stream_and_patch_types(start_method, tmp_path):
    # macOS starts processes by spawn, and Python 3.14 on Linux by forkserver: the workers then get the
    # queue's work by pickling, not by inheriting it
    script = tmp_path / "start_method.py"
    script.write_text(_START_METHOD_SCRIPT)
    command = [sys.executable, str(script), start_method]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    streams = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(streams["workers"]) == 2 * 5 * 3
    assert streams["workers"] == streams["in_process"]
    # set_track_meta(False) reaches the workers' patches: plain tensors, as without workers
    assert streams["untracked"] == {"in_process": ["Tensor"], "workers": ["Tensor"]}


def test_the_queue_pickles_without_its_workers(nifti_subjects):
    import pickle

    with nifti_queue(nifti_subjects, num_workers=2) as queue:
        copy = pickle.loads(pickle.dumps(queue))
        assert copy.worker_pids == [] and len(copy) == len(queue) == 8
        assert [p["id"] for p in copy] == [p["id"] for p in queue]


# --- memory ----------------------------------------------------------------------------------------------------


def private_rss_bytes() -> int:
    """Resident memory of this process that is its own (anonymous): the patches copied out and the batches,
    not the workers' shared blocks mapped here."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("/proc/self/status has no RssAnon line")


def test_memory_does_not_grow_over_epochs():
    from monai_patchqueue.data import shared_blocks
    from monai_patchqueue.data.background import BLOCKS_PER_WORKER
    from monai_patchqueue.data.block_pins import pinned_blocks_per_worker

    data = [{"image": torch.rand(1, 64, 64, 64), "id": i} for i in range(6)]
    queue = PatchQueueDataset(data, UniformSamplerd("image", 32, num_samples=4), 16, 4, num_workers=2, seed=0)
    epoch_bytes = 24 * 4 * 32**3
    after, blocks = [], []
    for _ in range(10):
        for _ in DataLoader(queue, batch_size=4):
            pass
        gc.collect()
        after.append(private_rss_bytes())
        blocks.append(len([key for key in shared_blocks._mapped if key[0] == queue._background._returns_token]))
    queue.close()
    # the allocator settles within the first epochs, in steps of up to 2 MiB (4.1 MiB in all on record);
    # keeping the patches would add one epoch's 3 MiB each epoch, 18 MiB over the last 6 measured
    growth = after[-1] - after[3]
    assert growth < 2 * epoch_bytes, f"private RSS grew by {growth / 2**20:.1f} MiB over epochs 5-10: {after}"
    # the workers' shared blocks (mapped here once returned) stay within the pools that get_max_memory counts
    assert max(blocks) <= 2 * (BLOCKS_PER_WORKER + pinned_blocks_per_worker(16, 4, num_workers=2)), blocks


# --- DDP -------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, port: int, use_sampler: bool, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        data = [{"image": torch.rand(1, 8, 8, 8), "id": i} for i in range(5)]
        data[3]["num_samples"] = 6  # uneven shares: the other rank must add patches
        sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=1) if use_sampler else None
        queue = PatchQueueDataset(data, UniformSamplerd("image", 4), 8, 2, subject_sampler=sampler, seed=7)
        epochs = []
        for epoch in range(2):
            queue.set_epoch(epoch)
            ids, batches, length = [], 0, len(queue)
            for batch in DataLoader(queue, batch_size=3):
                total = torch.tensor([len(batch["id"])])
                dist.all_reduce(total)  # hangs (then times out) if the ranks disagree on the number of batches
                ids.extend(batch["id"].tolist())
                batches += 1
            epochs.append({"ids": ids, "length": length, "batches": batches})
        results.put((rank, epochs))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("use_sampler", [False, True], ids=["automatic", "DistributedSampler"])
def test_two_gloo_ranks_share_subjects_disjointly_with_equal_lengths(use_sampler):
    context = mp.get_context("fork")
    results = context.SimpleQueue()
    port = _free_port()
    ranks = [context.Process(target=_ddp_rank, args=(rank, port, use_sampler, results)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(90)
        assert process.exitcode == 0, "a rank failed or hung"
    by_rank = dict(results.get() for _ in range(2))
    for epoch in range(2):
        first, second = by_rank[0][epoch], by_rank[1][epoch]
        assert first["length"] == second["length"] == len(first["ids"]) == len(second["ids"])
        assert first["batches"] == second["batches"]
        subjects = [set(first["ids"]), set(second["ids"])]
        if not use_sampler:  # our own sharding never duplicates a subject
            assert not subjects[0] & subjects[1]
        assert subjects[0] | subjects[1] == set(range(5))
        counts = collections.Counter(first["ids"]) + collections.Counter(second["ids"])
        assert counts[3] >= 6 and all(counts[i] >= 2 for i in range(5))
    assert by_rank[0][0]["ids"] != by_rank[0][1]["ids"]  # set_epoch reshuffles


# --- bundle configs --------------------------------------------------------------------------------------------


def test_a_bundle_config_builds_and_iterates_the_queue(nifti_subjects, tmp_path):
    config = {
        "datalist": nifti_subjects,
        "queue": {
            "_target_": "monai_patchqueue.PatchQueueDataset",
            "data": "@datalist",
            "sampler": {"_target_": "monai_patchqueue.UniformSamplerd", "keys": "image", "patch_size": [4, 4, 4]},
            "max_length": 4,
            "samples_per_volume": 3,
            "transform": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                    {"_target_": "EnsureChannelFirstd", "keys": "image"},
                ],
            },
            "num_workers": 1,
            "seed": 0,
        },
        "loader": {"_target_": "DataLoader", "dataset": "@queue", "batch_size": 4},
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    parser = ConfigParser()
    parser.read_config(str(path))
    loader = parser.get_parsed_content("loader")
    ids = [i for batch in loader for i in batch["id"].tolist()]
    assert collections.Counter(ids) == dict.fromkeys(range(4), 3)
    parser.get_parsed_content("queue").close()
