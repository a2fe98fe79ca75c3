"""The queue's worker processes keep freed memory for the next subject instead of faulting it in again, and
their garbage collections leave the objects they inherited alone."""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from monai_patchqueue.data.worker_memory import (
    _M_MMAP_MAX,
    _M_MMAP_THRESHOLD,
    _M_TRIM_THRESHOLD,
    _mallopt,
    freeze_inherited_objects,
    keep_freed_memory,
    start_worker,
)

pytestmark = pytest.mark.skipif(_mallopt() is None, reason="glibc's mallopt is not available")


class _FaultsPerSubject(torch.utils.data.Dataset):
    """Each item allocates and frees a subject's worth of memory (32 MiB of 1 MiB patches, or one 48 MiB volume:
    beyond the 32 MiB from which glibc gives every allocation a mapping of its own), and returns the page faults
    that took."""

    def __init__(self, pieces: int, mib: int, subjects: int) -> None:
        self.pieces, self.mib, self.subjects = pieces, mib, subjects

    def __len__(self) -> int:
        return self.subjects

    def __getitem__(self, index: int) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        pieces = [torch.ones(self.mib * 2**18 // self.pieces) for _ in range(self.pieces)]  # float32, all touched
        del pieces
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _faults(worker_init_fn, pieces: int = 32, mib: int = 32, subjects: int = 4) -> list[int]:
    subjects = _FaultsPerSubject(pieces, mib, subjects)
    loader = DataLoader(subjects, batch_size=None, num_workers=1, worker_init_fn=worker_init_fn)
    return [int(faults) for faults in loader]


def _returning(worker_id: int) -> None:
    """glibc's settings in a fresh process (a forked worker inherits whatever its parent's allocations set)."""
    for parameter in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD):
        _mallopt()(parameter, ctypes.c_int(128 * 2**10))
    _mallopt()(_M_MMAP_MAX, ctypes.c_int(65536))


def _returning_then_kept(worker_id: int) -> None:
    _returning(worker_id)
    assert keep_freed_memory(worker_id)


def _returning_then_started(worker_id: int) -> None:
    _returning(worker_id)
    start_worker(worker_id)


@pytest.mark.parametrize("keeping", [_returning_then_kept, _returning_then_started], ids=["kept", "started"])
def test_a_worker_that_keeps_freed_memory_reuses_it_where_a_fresh_worker_faults_it_in_again(keeping):
    pages = 32 * 2**20 // resource.getpagesize()
    kept, fresh = _faults(keeping), _faults(_returning)
    assert kept[0] >= pages / 2  # the first subject faults its memory in either way
    assert kept[-1] < pages / 4  # later subjects reuse it (a few hundred faults of other allocations under load)
    assert min(fresh[1:]) > pages / 2  # glibc's defaults return it to the system after each subject


@pytest.mark.parametrize("keeping", [_returning_then_kept, _returning_then_started], ids=["kept", "started"])
def test_a_volume_beyond_glibcs_largest_mmap_threshold_is_reused_where_a_fresh_worker_maps_it_anew(keeping):
    """glibc maps every allocation from 32 MiB on by itself and returns it on free, whatever its thresholds."""
    pages = 48 * 2**20 // resource.getpagesize()
    kept, fresh = _faults(keeping, 1, 48, subjects=8), _faults(_returning, 1, 48, subjects=8)
    assert kept[0] >= pages / 2 and min(fresh) > pages / 2  # a fresh worker faults every volume in
    # most later volumes reuse the memory; one may not, when a small allocation took the start of the freed space
    assert sum(faults < pages / 4 for faults in kept[1:]) >= 5, kept


class _CollectionCopies(torch.utils.data.Dataset):
    """Runs a full garbage collection in the worker; returns the objects it tracks, how many are frozen and how
    many KiB of the process's memory became private (copied from the parent) during the collection."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        before = _private_dirty_kib()
        gc.collect()
        return len(gc.get_objects()), gc.get_freeze_count(), _private_dirty_kib() - before


def _private_dirty_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Private_Dirty line in /proc/self/smaps_rollup")


def _collect_in_worker(worker_init_fn) -> tuple[int, int, int]:
    loader = DataLoader(_CollectionCopies(), batch_size=None, num_workers=1, worker_init_fn=worker_init_fn)
    return tuple(int(value) for value in next(iter(loader)))


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's smaps_rollup")
def test_a_started_worker_collects_garbage_without_walking_or_copying_what_it_inherited():
    inherited = [[index] for index in range(200_000)]  # tracked objects, some 20 MiB of the parent's heap
    gc.collect()  # the parent's own objects, old and settled, as in a training script
    tracked, frozen, copied_kib = _collect_in_worker(start_worker)
    plain_tracked, plain_frozen, plain_copied_kib = _collect_in_worker(None)
    assert frozen >= len(inherited) and plain_frozen == 0
    assert tracked < len(inherited) / 10 < plain_tracked / 10  # its collections walk only its own objects
    assert copied_kib < plain_copied_kib / 4, (copied_kib, plain_copied_kib)  # and leave the parent's pages shared
    assert plain_copied_kib > 8 * 2**10  # (a collection that walks them writes to every page of the lists)
    del inherited


def test_freeze_inherited_objects_says_how_many_it_froze():
    def frozen_in_worker(worker_id: int) -> None:
        assert freeze_inherited_objects() == gc.get_freeze_count() > 1000

    assert [int(item) for item in DataLoader(range(2), num_workers=1, worker_init_fn=frozen_in_worker)] == [0, 1]


def _rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * resource.getpagesize()


def test_workers_keeping_freed_memory_do_not_grow_over_epochs():
    from monai.transforms import Compose, RandGaussianNoised, ScaleIntensityd

    from monai_patchqueue import PatchQueueDataset, UniformSamplerd

    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 40 + 4 * (i % 5), 48, 56 - 2 * (i % 3)) for i in range(10)]  # sizes vary: fragmentation
    data = [{"image": torch.rand(shape, generator=generator)} for shape in shapes]
    transform = Compose([ScaleIntensityd("image"), RandGaussianNoised("image", prob=1.0)])  # new volumes
    sampler = UniformSamplerd("image", 24)
    rss = []
    with PatchQueueDataset(data, sampler, 16, 6, transform=transform, num_workers=2, seed=0) as queue:
        for _ in range(12):
            for _ in DataLoader(queue, batch_size=4):
                pass
            rss.append(sum(_rss_bytes(pid) for pid in queue.worker_pids))
    growth = rss[-1] - rss[2]
    leaked_patches = 9 * 10 * 6 * 4 * 24**3  # what keeping every patch of the epochs measured would add
    assert growth < leaked_patches / 4, f"workers' RSS grew by {growth / 2**20:.1f} MiB: {rss}"
