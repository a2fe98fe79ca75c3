"""The queue's workers start with the training process's MONAI and torch settings, then prepare their memory."""

from __future__ import annotations

import gc
import pickle

import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from torch.utils.data import DataLoader

from monai_patchqueue import PatchQueueDataset, UniformSamplerd
from monai_patchqueue.data.background import BackgroundTasks
from monai_patchqueue.data.planner import EpochPlanner
from monai_patchqueue.data.subject_patches import SubjectPatches
from monai_patchqueue.data.worker_start import WorkerStart


class _Settings(torch.utils.data.Dataset):
    """Reports the worker's metadata tracking, default dtype and frozen-object count."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[bool, str, int]:
        return get_track_meta(), str(torch.get_default_dtype()), gc.get_freeze_count()


def _settings_in_worker(worker_init_fn) -> tuple[bool, str, int]:
    loader = DataLoader(_Settings(), batch_size=None, num_workers=1, worker_init_fn=worker_init_fn)
    return tuple(next(iter(loader)))


def test_a_worker_takes_the_settings_it_is_given_and_prepares_its_memory():
    # settings unlike this process's: a forked worker would otherwise inherit True and float32
    start = WorkerStart(track_meta=False, default_dtype=torch.float64)
    track_meta, default_dtype, frozen = _settings_in_worker(start)
    assert (track_meta, default_dtype) == (False, "torch.float64")
    assert frozen > 0  # start_worker froze the inherited objects
    assert _settings_in_worker(None) == (True, "torch.float32", 0)


def test_the_settings_are_those_of_the_calling_process_and_pickle_for_spawned_workers():
    start = WorkerStart.of_this_process()
    assert start == WorkerStart(track_meta=get_track_meta(), default_dtype=torch.get_default_dtype())
    assert pickle.loads(pickle.dumps(start)) == start


def test_the_queue_starts_its_workers_with_the_settings_of_the_moment_they_start(monkeypatch):
    work = SubjectPatches([{"image": torch.zeros(1, 8, 8, 8)}], UniformSamplerd("image", 4))
    with_workers = BackgroundTasks(work, EpochPlanner([2], seed=0, shuffle_subjects=False), num_workers=1)
    in_process = BackgroundTasks(work, EpochPlanner([2], seed=0, shuffle_subjects=False), num_workers=0)
    try:
        monkeypatch.setattr("monai_patchqueue.data.worker_start.get_track_meta", lambda: False)
        with_workers.start(0)
        assert with_workers._loader.worker_init_fn == WorkerStart(track_meta=False, default_dtype=torch.float32)
        in_process.start(0)
        assert in_process._loader.worker_init_fn is None  # the training process is left alone
    finally:
        with_workers.close()
        in_process.close()


def test_untracked_metadata_reaches_the_workers_patches():
    # (with fork the workers would inherit it anyway; tests/test_data_queue_processes.py runs spawn and forkserver)
    from monai.data import set_track_meta

    data = [{"image": MetaTensor(torch.rand(1, 10, 10, 10))} for _ in range(2)]
    set_track_meta(False)
    try:
        with PatchQueueDataset(data, UniformSamplerd("image", 4), 4, 2, num_workers=1, seed=0) as queue:
            kinds = {type(patch["image"]) for patch in queue}
    finally:
        set_track_meta(True)
    assert kinds == {torch.Tensor}
