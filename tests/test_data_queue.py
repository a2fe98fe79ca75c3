"""PatchQueueDataset in one process and with workers: counts, epochs, shuffling, determinism, samplers, memory."""

from __future__ import annotations

import collections
import gc
import logging
import re
import time

import numpy as np
import pytest
import torch
from monai.data import DataLoader as MonaiDataLoader
from monai.data import MetaTensor, ThreadDataLoader, set_track_meta
from monai.transforms import (
    Compose,
    Lambdad,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandScaleIntensityd,
    RandSpatialCropSamplesd,
    RandWeightedCropd,
)
from scipy.stats import binomtest
from torch.utils.data import DataLoader

from monai_patchqueue import LabelSamplerd, PatchQueueDataset, UniformSamplerd
from monai_patchqueue.data.background import RESULT_POLL_S
from monai_patchqueue.data.serving import slab_capacity
from monai_patchqueue.transforms.functional import shifted_affine


def subjects(n: int = 6, size: int = 12, counts: dict[int, int] | None = None) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    data = []
    for index in range(n):
        affine = torch.eye(4, dtype=torch.float64)
        affine[:3, 3] = torch.tensor([index, 2.0 * index, 0.0])
        image = MetaTensor(torch.rand(1, size, size, size, generator=generator) + index, affine=affine)
        label = MetaTensor((torch.rand(1, size, size, size, generator=generator) * 3).long(), affine=affine)
        entry = {"image": image, "label": label, "id": index}
        if counts and index in counts:
            entry["num_samples"] = counts[index]
        data.append(entry)
    return data


def queue_of(data=None, *, sampler=None, max_length=8, samples_per_volume=4, **kwargs) -> PatchQueueDataset:
    sampler = sampler or UniformSamplerd(["image", "label"], 4, num_samples=3)
    kwargs.setdefault("seed", 0)
    return PatchQueueDataset(subjects() if data is None else data, sampler, max_length, samples_per_volume, **kwargs)


def stream(queue: PatchQueueDataset, epochs: int = 1, batch_size: int = 4) -> list[tuple]:
    out = []
    for _ in range(epochs):
        for batch in DataLoader(queue, batch_size=batch_size):
            for i in range(len(batch["id"])):
                out.append((int(batch["id"][i]), tuple(batch["location"][i].tolist()), float(batch["image"][i].sum())))
    return out


# --- construction ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_length": 3, "samples_per_volume": 4}, ValueError, "max_length=3 and samples_per_volume=4"),
        ({"max_length": 0}, ValueError, "max_length=0"),
        ({"samples_per_volume": -1}, ValueError, "samples_per_volume=-1"),
        ({"num_workers": -1}, ValueError, "num_workers=-1"),
        ({"seed": -3}, ValueError, "seed=-3"),
        ({"shuffle_patches": "yes"}, TypeError, "shuffle_patches='yes'"),
        ({"sampler": "not a transform"}, TypeError, "sampler="),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        queue_of(**kwargs)


@pytest.mark.parametrize(("count", "error"), [(0, ValueError), (2.5, TypeError), ("4", TypeError)])
def test_a_subject_count_that_is_not_a_positive_integer_raises_naming_the_subject(count, error):
    with pytest.raises(
        error, match=rf"subject 1 \{{.*\}}: `num_samples` should be a positive integer, but got num_samples={count!r}"
    ):
        queue_of(subjects(counts={1: count}))


def test_a_subject_asking_for_more_patches_than_the_buffer_holds_raises():
    with pytest.raises(ValueError, match=r"subject 2 .*num_samples=9 > max_length=8"):
        queue_of(subjects(counts={2: 9}))
    with pytest.raises(ValueError, match="`data` should hold at least one subject"):
        queue_of([{"image": 1}][:0])


# --- epochs and counts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_subject_yields_exactly_its_count_every_epoch(num_workers):
    counts = {1: 1, 4: 7}
    with queue_of(subjects(counts=counts), num_workers=num_workers) as queue:
        expected = {i: counts.get(i, 4) for i in range(6)}
        assert len(queue) == sum(expected.values())
        for _ in range(3):
            served = stream(queue)
            assert collections.Counter(item[0] for item in served) == expected
            assert len({item[1:] for item in served}) > 0.9 * len(served)  # distinct patches, not copies


def test_batches_carry_each_patch_affine_and_location():
    queue = queue_of()
    batch = next(iter(DataLoader(queue, batch_size=5)))
    assert batch["image"].shape == (5, 1, 4, 4, 4)
    assert batch["location"].shape == (5, 6) and batch["location"].dtype == torch.int64
    for i in range(5):
        subject = subjects()[int(batch["id"][i])]
        start = batch["location"][i, :3].tolist()
        expected = shifted_affine(subject["image"].affine, start)
        assert torch.allclose(batch["image"].affine[i].to(expected.dtype), expected)
        box = tuple(slice(a, b) for a, b in zip(start, batch["location"][i, 3:].tolist()))
        assert torch.equal(batch["image"][i].as_tensor(), subject["image"][(slice(None), *box)].as_tensor())
    queue.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_without_metadata_tracking_patches_are_plain_tensors_cut_at_their_location(num_workers):
    set_track_meta(False)  # forked workers inherit it
    try:
        with queue_of(num_workers=num_workers) as queue:
            batches = list(ThreadDataLoader(queue, batch_size=4))
    finally:
        set_track_meta(True)
    assert sum(len(batch["id"]) for batch in batches) == len(queue)
    batch = batches[0]
    assert type(batch["image"]) is torch.Tensor and type(batch["label"]) is torch.Tensor
    for i in range(4):
        start, end = batch["location"][i, :3].tolist(), batch["location"][i, 3:].tolist()
        box = (slice(None), *(slice(a, b) for a, b in zip(start, end)))
        assert torch.equal(batch["image"][i], subjects()[int(batch["id"][i])]["image"][box].as_tensor())


@pytest.mark.parametrize("loader", [MonaiDataLoader, ThreadDataLoader])
def test_monai_loaders_collate_queue_patches(loader):
    with queue_of() as queue:
        batches = list(loader(queue, batch_size=4))
    assert sum(len(b["id"]) for b in batches) == 24
    assert isinstance(batches[0]["image"], MetaTensor) and batches[0]["image"].affine.shape == (4, 4, 4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_abandoned_part_way_leaves_nothing_behind(num_workers, monkeypatch):
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    with queue_of(max_length=16, num_workers=num_workers) as queue:
        for epoch in range(6):  # MONAI's loader: once the queue sees it, it serves chunks after each first slab
            for index, _batch in enumerate(MonaiDataLoader(queue, batch_size=2)):
                if epoch == 5 and index == 10:  # within the chunk after the first slab of 16: the consumer stops
                    break
        gc.collect()
        assert sum(len(b["id"]) for b in MonaiDataLoader(queue, batch_size=2)) == len(queue)
    gc.collect()
    assert [hook.exc_value for hook in unraisable] == []


def test_shuffle_subjects_changes_the_order_between_epochs():
    queue = queue_of(shuffle_patches=False, max_length=4)
    orders = [[item[0] for item in stream(queue)][::4] for _ in range(4)]
    assert all(sorted(order) == list(range(6)) for order in orders)
    assert len({tuple(order) for order in orders}) > 1
    fixed = queue_of(shuffle_patches=False, shuffle_subjects=False, max_length=4)
    assert [item[0] for item in stream(fixed, epochs=2)][::4] == list(range(6)) * 2


def test_shuffled_patches_mix_subjects_within_batches():
    def single_subject_batches(queue):
        batches = [b["id"] for b in DataLoader(queue, batch_size=4)]
        return sum(len(set(ids.tolist())) == 1 for ids in batches), len(batches)

    mixed, total = single_subject_batches(queue_of(max_length=16))
    assert mixed <= 1, f"{mixed} of {total} batches came from a single subject"
    ordered, total = single_subject_batches(queue_of(max_length=16, shuffle_patches=False))
    assert ordered == total


def test_the_buffer_is_topped_up_while_patches_are_consumed_not_only_when_empty():
    # Buffer of 8 = two subjects; the third subject enters as soon as four patches have left. A queue that
    # refills only when empty would serve all 8 patches of the first two subjects before any of the third.
    early = 0
    for seed in range(20):
        served = [item[0] for item in stream(queue_of(max_length=8, shuffle_subjects=False, seed=seed))]
        early += any(subject == 2 for subject in served[:8])
    assert early >= 15


def test_patch_order_is_uniform_over_the_buffer():
    # With two subjects in a buffer of 8 and shuffled pops, the first patch is from subject 0 half the time.
    firsts = [stream(queue_of(max_length=8, shuffle_subjects=False, seed=seed))[0][0] for seed in range(200)]
    assert binomtest(sum(f == 0 for f in firsts), len(firsts), 0.5).pvalue > 1e-3


# --- determinism -----------------------------------------------------------------------------------------------


def test_the_stream_is_identical_for_0_1_and_2_workers():
    streams = []
    for num_workers in (0, 1, 2):
        with queue_of(num_workers=num_workers, seed=5) as queue:
            streams.append(stream(queue, epochs=2))
    assert streams[0] == streams[1] == streams[2]


def _with_header(data: list[dict]) -> list[dict]:
    for entry in data:
        for key in ("image", "label"):
            entry[key].meta["pixdim"] = np.array([1.0, 1.5, 2.0])
    return data


def _double_pixdim_in_place(patch: dict) -> dict:
    patch["image"].meta["pixdim"] *= 2  # in place, as some transforms update metadata
    return patch


def _pixdims(queue: PatchQueueDataset) -> list[tuple]:
    return [
        (tuple(batch["location"][i].tolist()), tuple(batch["image"].meta["pixdim"][i].tolist()))
        for batch in DataLoader(queue, batch_size=4)
        for i in range(len(batch["location"]))
    ]


def test_workers_serve_each_patch_its_own_header_values_with_or_without_a_patch_transform():
    # without a patch_transform the workers let a subject's patches share one copy of its header; a
    # patch_transform that changes one patch's header in place must change that patch's alone
    # (or a transform that follows the sampler in a Compose)
    sampler = UniformSamplerd(["image", "label"], 4, num_samples=3)
    cases = [
        (sampler, None, (1.0, 1.5, 2.0)),
        (sampler, _double_pixdim_in_place, (2.0, 3.0, 4.0)),
        (Compose([sampler, _double_pixdim_in_place]), None, (2.0, 3.0, 4.0)),
    ]
    for sampler, patch_transform, pixdim in cases:
        served = []
        for num_workers in (0, 2):
            kwargs = {"num_workers": num_workers, "patch_transform": patch_transform, "sampler": sampler}
            with queue_of(_with_header(subjects()), **kwargs) as queue:
                served.append(_pixdims(queue))
        assert served[0] == served[1] and len(served[0]) == 24
        assert {values for _, values in served[0]} == {pixdim}


class _SlowSubject:
    """A transform that takes ``seconds`` for subject ``slow`` (longer than the unpacking thread's poll)."""

    def __init__(self, slow: int, seconds: float) -> None:
        self.slow, self.seconds = slow, seconds

    def __call__(self, subject: dict) -> dict:
        if subject["id"] == self.slow:
            time.sleep(self.seconds)
        return subject


def test_a_subject_slower_than_the_result_poll_changes_nothing_in_the_stream():
    # the unpacking thread waits for each result in slices of RESULT_POLL_S and resumes the DataLoader's wait
    # when a slice runs out: nothing may be skipped, repeated or reordered
    slow = _SlowSubject(slow=2, seconds=4 * RESULT_POLL_S)
    with queue_of(num_workers=0, seed=5) as zero, queue_of(num_workers=2, seed=5, transform=slow) as two:
        assert stream(two, epochs=2) == stream(zero, epochs=2)


def test_seeds_epochs_and_set_epoch_position_the_stream():
    first, second = queue_of(seed=1), queue_of(seed=1)
    epoch0, epoch1 = stream(first), stream(first)
    assert stream(second) == epoch0 and epoch0 != epoch1
    assert stream(queue_of(seed=2)) != epoch0
    second.set_epoch(1)
    assert stream(second) == epoch1
    second.set_epoch(0)
    assert stream(second) == epoch0
    reseeded = queue_of(seed=9).set_random_state(seed=1)
    assert stream(reseeded) == epoch0
    with pytest.raises(ValueError, match="epoch=-1"):
        second.set_epoch(-1)


def test_random_transforms_and_patch_transforms_are_seeded_per_subject():
    def make(num_workers):
        return queue_of(
            transform=RandScaleIntensityd("image", factors=0.5, prob=1.0),
            patch_transform=Compose([RandScaleIntensityd("image", factors=0.5, prob=1.0), Lambdad("id", lambda x: x)]),
            num_workers=num_workers,
            seed=3,
        )

    with make(0) as zero, make(2) as two:
        a, b = stream(zero), stream(two)
    assert a == b
    plain = stream(queue_of(seed=3))
    assert [item[2] for item in a] != [item[2] for item in plain]


def test_the_callers_sampler_and_transforms_are_not_mutated():
    sampler = UniformSamplerd(["image", "label"], 4, num_samples=3)
    state = sampler.sampler.R.get_state()[1].copy()
    stream(queue_of(sampler=sampler, samples_per_volume=5))
    assert sampler.sampler.num_samples == 3
    assert np.array_equal(sampler.sampler.R.get_state()[1], state)


# --- samplers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler",
    [
        LabelSamplerd(["image", "label"], 4, "label", num_samples=2, label_probabilities={0: 1, 1: 1, 2: 1}),
        RandSpatialCropSamplesd(["image", "label"], 4, num_samples=3, random_size=False),
        RandWeightedCropd(["image", "label"], "image", (4, 4, 4), num_samples=2),
        RandCropByLabelClassesd(["image", "label"], "label", 4, ratios=[1, 1, 1], num_classes=3, num_samples=2),
        RandCropByPosNegLabeld(["image", "label"], "label", 4, num_samples=2),
    ],
    ids=["LabelSamplerd", "RandSpatialCropSamplesd", "RandWeightedCropd", "RandCropByLabelClassesd", "PosNeg"],
)
def test_monai_and_our_samplers_give_exact_counts_of_compact_patches(sampler):
    with queue_of(sampler=sampler, samples_per_volume=5, max_length=10, num_workers=0) as queue:
        patches = list(queue)
    assert collections.Counter(p["id"] for p in patches) == dict.fromkeys(range(6), 5)
    for patch in patches[:5]:
        assert patch["image"].shape == (1, 4, 4, 4)
        # a row of the slab of 10 patches it was served in, not a view of the 12^3 volume
        assert patch["image"].untyped_storage().nbytes() == slab_capacity(10) * patch["image"].numel() * 4


def test_arrays_the_sampler_does_not_crop_stay_behind():
    with queue_of(sampler=UniformSamplerd("image", 4, num_samples=4)) as queue:
        patch = next(iter(queue))
    assert "label" not in patch and patch["id"] in range(6) and patch["image"].shape == (1, 4, 4, 4)


def test_a_transform_returning_several_dicts_is_refused_with_advice():
    with queue_of(transform=lambda d: [d, d]) as queue, pytest.raises(RuntimeError, match="put patch samplers in"):
        next(iter(queue))


def test_a_dataset_with_data_attribute_gives_counts_and_subject_names():
    from monai.data import Dataset

    dataset = Dataset(subjects(counts={0: 2}))
    with queue_of(dataset) as queue:
        assert len(queue) == 2 + 5 * 4
        assert collections.Counter(p["id"] for p in queue)[0] == 2


# --- memory, logging, repr -------------------------------------------------------------------------------------


def test_get_max_memory_counts_every_patch_that_can_be_held():
    with queue_of(num_workers=2, max_length=8, samples_per_volume=4) as queue:
        patch = next(iter(queue))
        patch_bytes = 4 * 4**3 + 8 * 4**3 + 6 * 8  # float32 image, int64 label, int64 location
        assert sum(v.numel() * v.element_size() for v in patch.values() if torch.is_tensor(v)) == patch_bytes
        # the buffer, two slabs of 8 (max_length) patches, 1 subject being unpacked here, and the workers' shared
        # memory: 4 blocks each in flight and 4 each pinned here (half of two buffers' worth of 4-patch subjects,
        # and 2 in transit), each one subject's patches (4 x 808 bytes, each key's stack aligned to 64) rounded up
        # to 1 MiB
        assert queue.get_max_memory() == patch_bytes * (8 + 2 * 8 + 4) + 2 * (4 + 4) * 2**20
        assert queue.get_max_memory(subjects()[0]) == queue.get_max_memory()
        assert queue.get_max_memory_pretty() == f"{(patch_bytes * 28 + 16 * 2**20) / 2**20:.2f} MiB"
        assert queue.max_patches_held == 8 + 2 * 8 + (2 * 2 + 1) * 4
    with queue_of(num_workers=0, max_length=8, samples_per_volume=4) as queue:
        assert queue.get_max_memory() == patch_bytes * (8 + 2 * 8)  # the buffer and the slabs


def test_verbose_logs_fills_and_timings(caplog):
    with caplog.at_level(logging.INFO, logger="monai_patchqueue.data.queue"), queue_of(verbose=True) as queue:
        stream(queue)
    messages = [record.getMessage() for record in caplog.records]
    assert any("gave 4 patches" in m for m in messages)
    assert any("24 patches in" in m for m in messages)
    quiet = queue_of()
    caplog.clear()
    stream(quiet)
    assert not caplog.records


def test_verbose_logs_with_workers_say_how_the_patches_crossed(caplog):
    with caplog.at_level(logging.INFO, logger="monai_patchqueue.data.queue"):
        with queue_of(verbose=True, num_workers=2) as queue:
            stream(queue)
            pins = queue._background._pins
    ended = [record.getMessage() for record in caplog.records if "24 patches in" in record.getMessage()]
    assert len(ended) == 1
    found = re.search(r"so far (\d+) subjects served as views of shared memory, (\d+) copied out", ended[0])
    views, copies = int(found[1]), int(found[2])
    assert views + copies >= 6  # every subject of the epoch arrived one way or the other (and next epoch's, maybe)
    assert 0 < views <= pins.pinned_subjects  # the workers went on after the message


def test_repr_and_statistics_summarise_the_state():
    queue = queue_of(num_workers=0)
    stream(queue)
    text = repr(queue)
    assert "subjects=6" in text and "epoch=1" in text and "patches_per_epoch=24" in text and "seed=0" in text
    assert queue.statistics.epoch == 0 and queue.statistics.patches == 24 and queue.statistics.elapsed_s > 0


@pytest.mark.parametrize("loader", [MonaiDataLoader, ThreadDataLoader])
def test_monai_loaders_keep_an_explicit_seed_and_seed_a_seedless_queue(loader):
    from monai.utils import set_determinism

    def sums(seed):
        with queue_of(seed=seed) as queue:
            return [float(b["image"].sum()) for b in loader(queue, batch_size=4)]

    torch.manual_seed(123)  # MONAI's loaders draw their dataset seed from torch's global generator
    first = sums(4)
    torch.manual_seed(321)
    assert sums(4) == first
    set_determinism(7)
    seedless = sums(None)
    set_determinism(7)
    assert sums(None) == seedless
    set_determinism(None)
