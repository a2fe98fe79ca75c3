"""Patch throughput of PatchQueueDataset against TorchIO's Queue and MONAI's Dataset + multi-sample crop, in one run.

Generated data: 12 subjects of 192 x 192 x 160 float32 images with 3-class uint8 labels, saved once as .nii.gz
and as .nii; patch 64^3, 16 patches per subject, buffer of 64 patches, batches of 8, 2 workers. Each contender
is built, runs one warm-up epoch, then ``--epochs`` timed epochs back to back (epoch boundaries and refills
included), and is closed; the contenders take turns, round after round. The load-bound ceiling is 16 patches x 2
workers / (time to load one subject in this process), measured in the same run twice: with MONAI's LoadImaged (ITK for
.nii.gz, nibabel for .nii), as TorchIO and MONAI load, and with the package's LoadMappedNiftid. Each is also
timed as the queue's workers load: in a forked process prepared as they are (``start_worker``: glibc keeps
freed memory for reuse), in case that loads faster than this process (on 2026-12-04 the two agreed within
noise).

monai_patchqueue loads with LoadMappedNiftid (.nii memory-mapped, .nii.gz decompressed by ITK, no C-ordered
copy of the volume), and also runs with LoadImaged, as the other contenders load, in its own column.

    python benchmarks/bench_queue.py [--repeats 3] [--epochs 2] [--step-ms 0] [--formats .nii] [--samplers uniform]
        [--torch-threads 1] [--our-batches thread|torch] [--keep-freed-memory] [--no-header] [--channels 1]
    # writes benchmarks/results/queue*.md; a subset of formats or samplers, or other threads, batches or
    # allocator settings, writes its own file

With ``--step-ms 50`` the consumer sleeps 50 ms per batch (a simulated training step) and the table reports the
fraction of the epoch's wall time the consumer spent waiting for data after its first batch. With
``--channels 4`` the images are 4-channel 4-D files (channels last, as NIfTI stores them), the labels as before.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from monai.data import DataLoader as MonaiDataLoader
from monai.data import Dataset, ThreadDataLoader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandCropByLabelClassesd, RandSpatialCropSamplesd
from torch.nn.functional import interpolate
from torch.utils.data import DataLoader

from monai_patchqueue import LabelSamplerd, LoadMappedNiftid, PatchQueueDataset, UniformSamplerd, keep_freed_memory
from monai_patchqueue.data.worker_memory import start_worker

SHAPE = (192, 192, 160)
SUBJECTS = 12
PATCH = 64
SAMPLES_PER_VOLUME = 16
MAX_LENGTH = 64
BATCH = 8
WORKERS = 2
EPOCHS = 2
"""Timed epochs per contender and round (``--epochs``). On 2026-12-07, 6 instead of 2 (our queue's window 1.4
instead of 0.45 s on .nii) left the spread of the rounds' ratios to TorchIO as it was (4.3-5.7x against 4.5-6.2x,
5 rounds each): the machine's noise, not the window, sets it."""
KEYS = ["image", "label"]
FORMATS = (".nii.gz", ".nii")
SAMPLERS = ("label", "uniform")
WITH_LOADIMAGED = "monai_patchqueue with LoadImaged"
RESULTS = Path(__file__).parent / "results"


def make_subjects(folder: Path, suffix: str, channels: int = 1) -> list[dict]:
    """Write (once) and return the datalist of smooth synthetic images with 3-class labels.

    With ``channels`` above 1 the images are 4-D files of that many channels (last, as NIfTI stores them, e.g.
    the Medical Segmentation Decathlon's multi-modal MRI), written to ``folder`` with a ``_{channels}ch``
    suffix; the label stays one 3-D volume.
    """
    if channels > 1:
        folder = folder.with_name(f"{folder.name}_{channels}ch")
    folder.mkdir(parents=True, exist_ok=True)
    datalist = []
    for index in range(SUBJECTS):
        image_path, label_path = folder / f"image_{index:02d}{suffix}", folder / f"label_{index:02d}{suffix}"
        if not (image_path.exists() and label_path.exists()):
            generator = torch.Generator().manual_seed(index)
            coarse = torch.rand(1, 1, 12, 12, 10, generator=generator)
            smooth = interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=False)[0, 0]
            image = smooth + 0.05 * torch.randn(SHAPE, generator=generator)
            if channels > 1:  # each channel the same anatomy, with its own contrast and noise
                contrasts = torch.linspace(1.0, 2.0, channels)
                image = smooth[..., None] * contrasts + 0.05 * torch.randn((*SHAPE, channels), generator=generator)
            label = torch.bucketize(smooth, torch.tensor([0.4, 0.6])).to(torch.uint8)
            affine = np.diag([1.0, 1.0, 1.2, 1.0])
            nib.save(nib.Nifti1Image(image.numpy().astype(np.float32), affine), image_path)
            nib.save(nib.Nifti1Image(label.numpy(), affine), label_path)
        datalist.append({"image": str(image_path), "label": str(label_path)})
    return datalist


def loader_for(suffix: str) -> Compose:
    """MONAI's fastest reader for the format here: ITK decompresses .nii.gz about 2x faster than nibabel."""
    reader = "ITKReader" if suffix == ".nii.gz" else "NibabelReader"
    return Compose([
        LoadImaged("image", reader=reader, image_only=True),
        LoadImaged("label", reader=reader, image_only=True, dtype=np.uint8),
        EnsureChannelFirstd(KEYS),
    ])  # fmt: skip


def mapped_loader(keep_header: bool = True) -> Compose:
    """The package's loader: values and metadata of LoadImaged (without the raw NIfTI header fields unless
    ``keep_header``), .nii voxels left memory-mapped."""
    return Compose([
        LoadMappedNiftid("image", ensure_channel_first=True, keep_header=keep_header),
        LoadMappedNiftid("label", dtype=np.uint8, ensure_channel_first=True, keep_header=keep_header),
    ])  # fmt: skip


def ours_with_our_loader(
    datalist: list[dict], sampler: str, load: Compose, batches: str = "thread", keep_header: bool = True
) -> Iterable:
    """Our queue loading through our own mapped loader.

    ``load`` is ignored on purpose: it is taken only so that this contender has the
    same signature as the others, and the subjects are read by
    ``mapped_loader(keep_header)`` instead of MONAI's ``LoadImaged``.
    """
    return ours(datalist, sampler, mapped_loader(keep_header), batches)


def ours(datalist: list[dict], sampler: str, load: Compose, batches: str = "thread") -> Iterable:
    """Our queue, read through MONAI's ThreadDataLoader (``batches="thread"``) or torch's DataLoader."""
    if sampler == "label":
        classes = {0: 1, 1: 1, 2: 1}
        patch_sampler = LabelSamplerd(KEYS, PATCH, "label", SAMPLES_PER_VOLUME, label_probabilities=classes)
    else:
        patch_sampler = UniformSamplerd(KEYS, PATCH, num_samples=SAMPLES_PER_VOLUME)
    queue = PatchQueueDataset(
        datalist, patch_sampler, MAX_LENGTH, SAMPLES_PER_VOLUME, transform=load, num_workers=WORKERS
    )
    if batches == "torch":
        return Contender(DataLoader(queue, batch_size=BATCH), queue.close)
    return Contender(ThreadDataLoader(queue, batch_size=BATCH, buffer_size=2), queue.close)


def torchio_queue(datalist: list[dict], sampler: str, load: Compose) -> Iterable:
    subjects = [tio.Subject(image=tio.ScalarImage(d["image"]), label=tio.LabelMap(d["label"])) for d in datalist]
    if sampler == "label":
        patch_sampler = tio.LabelSampler(PATCH, label_name="label", label_probabilities={0: 1, 1: 1, 2: 1})
    else:
        patch_sampler = tio.UniformSampler(PATCH)
    queue = tio.Queue(tio.SubjectsDataset(subjects), MAX_LENGTH, SAMPLES_PER_VOLUME, patch_sampler, num_workers=WORKERS)
    return Contender(DataLoader(queue, batch_size=BATCH))


def monai_dataset(datalist: list[dict], sampler: str, load: Compose) -> Iterable:
    if sampler == "label":
        crop = RandCropByLabelClassesd(KEYS, "label", PATCH, [1, 1, 1], num_classes=3, num_samples=SAMPLES_PER_VOLUME)
    else:
        crop = RandSpatialCropSamplesd(KEYS, PATCH, num_samples=SAMPLES_PER_VOLUME, random_size=False)
    dataset = Dataset(datalist, Compose([load, crop]))
    loader = MonaiDataLoader(dataset, batch_size=BATCH // SAMPLES_PER_VOLUME or 1, shuffle=True, num_workers=WORKERS)
    return Contender(loader)


class Contender:
    """A loader of patch batches and how to release its workers."""

    def __init__(self, loader: Iterable, close: Callable[[], None] | None = None) -> None:
        self.loader = loader
        self.close = close or (lambda: None)


def epochs(contender: Contender, step_s: float, count: int = EPOCHS) -> tuple[int, float, float]:
    """Run one warm-up epoch, then ``count`` timed ones; return their patches, wall seconds and seconds waited
    after each epoch's first batch."""
    consume(contender.loader, step_s)
    patches, waited, start = 0, 0.0, time.perf_counter()
    for _ in range(count):
        epoch_patches, epoch_waited = consume(contender.loader, step_s)
        patches, waited = patches + epoch_patches, waited + epoch_waited
    wall = time.perf_counter() - start
    contender.close()
    return patches, wall, waited


def consume(loader: Iterable, step_s: float) -> tuple[int, float]:
    patches, waited, iterator = 0, 0.0, iter(loader)
    while True:
        asked = time.perf_counter()
        batch = next(iterator, None)
        if batch is None:
            return patches, waited
        if patches:
            waited += time.perf_counter() - asked
        size = len(batch["location"]) if "location" in batch else len(batch["image"])
        patches += size
        time.sleep(step_s * size / BATCH)


def load_seconds(datalist: list[dict], load: Compose, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time to load one subject, over every subject, after a pause for other processes to exit; wall
    time, or CPU time with ``clock=time.process_time``."""
    time.sleep(0.5)
    load(dict(datalist[0]))  # warm-up: lazy imports, page cache
    times = []
    for entry in datalist:
        start = clock()
        load(dict(entry))
        times.append(clock() - start)
    return statistics.median(times)


_LOAD_JOB: tuple[list[dict], Compose, Callable[[], float]] | None = None  # what a forked timing process inherits


def _time_inherited_load_job() -> float:
    assert _LOAD_JOB is not None
    return load_seconds(*_LOAD_JOB)


def load_seconds_as_workers(
    datalist: list[dict], load: Compose, clock: Callable[[], float] = time.perf_counter
) -> float:
    """:func:`load_seconds` in a forked process started as the queue starts its workers (``start_worker``)."""
    global _LOAD_JOB
    _LOAD_JOB = (datalist, load, clock)
    try:
        with multiprocessing.get_context("fork").Pool(1, initializer=start_worker) as pool:
            return pool.apply(_time_inherited_load_job)
    finally:
        _LOAD_JOB = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="timed epochs per contender and round")
    parser.add_argument("--step-ms", type=float, default=0.0)
    parser.add_argument("--data", type=Path, default=RESULTS / "queue_data")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument(
        "--channels", type=int, default=1, help="image channels: above 1, 4-D images (channels last in the file)"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch's intra-op threads in this (the training) process"
    )
    parser.add_argument(
        "--our-batches",
        choices=("thread", "torch"),
        default="thread",
        help="read our queue through MONAI's ThreadDataLoader (default) or torch's DataLoader",
    )
    parser.add_argument(
        "--no-header",
        action="store_true",
        help="our loader drops the raw NIfTI header fields (LoadMappedNiftid(keep_header=False))",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="call monai_patchqueue.keep_freed_memory() in this (the training) process: every contender runs with it",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    contenders = {
        "monai_patchqueue": functools.partial(
            ours_with_our_loader, batches=args.our_batches, keep_header=not args.no_header
        ),
        WITH_LOADIMAGED: functools.partial(ours, batches=args.our_batches),
        "TorchIO Queue": torchio_queue,
        "MONAI Dataset + crop": monai_dataset,
    }
    rows = []
    for suffix in args.formats:
        datalist, load = make_subjects(args.data, suffix, args.channels), loader_for(suffix)
        for sampler in args.samplers:
            rates: dict[str, list[float]] = {name: [] for name in contenders}
            waits: dict[str, list[float]] = {name: [] for name in contenders}
            ceilings, our_ceilings, worker_ceilings, our_worker_ceilings = [], [], [], []
            for _ in range(args.repeats):
                our_loader = mapped_loader(keep_header=not args.no_header)
                for timed, ceiling_list, loader in (
                    (load_seconds, ceilings, load),
                    (load_seconds, our_ceilings, our_loader),
                    (load_seconds_as_workers, worker_ceilings, load),
                    (load_seconds_as_workers, our_worker_ceilings, our_loader),
                ):
                    ceiling_list.append(SAMPLES_PER_VOLUME * WORKERS / timed(datalist, loader))
                for name, make in contenders.items():
                    patches, wall, waited = epochs(make(datalist, sampler, load), args.step_ms / 1000, args.epochs)
                    assert patches == args.epochs * SUBJECTS * SAMPLES_PER_VOLUME, (name, patches)
                    rates[name].append(patches / wall)
                    waits[name].append(waited / wall)
            row = {"format": suffix, "sampler": sampler, "ceiling": statistics.median(ceilings)}
            row["our ceiling"] = statistics.median(our_ceilings)
            row["workers ceiling"] = statistics.median(worker_ceilings)
            row["our workers ceiling"] = statistics.median(our_worker_ceilings)
            row.update({name: (statistics.median(rates[name]), statistics.median(waits[name])) for name in contenders})
            row["ratios"] = paired_ratios(rates, ceilings, our_ceilings, list(contenders))
            row["ratios"] |= {
                f"{key} as workers": value
                for key, value in paired_ratios(rates, worker_ceilings, our_worker_ceilings, list(contenders)).items()
            }
            rows.append(row)
            print(row | {"rounds": rates}, flush=True)
    write_table(rows, list(contenders), args)


def paired_ratios(rates: dict[str, list[float]], ceilings: list[float], our_ceilings: list[float], names: list[str]):
    """Return the ratios the table reports, each the median over rounds of that round's ratio.

    The machine's speed drifts by 20-30% over minutes; a ratio of two rates from the same round (taken a few
    seconds apart) cancels most of that drift, where a ratio of two medians over all rounds does not.
    """
    ours, plain, torchio = (rates[name] for name in names[:3])

    def median_of(pairs) -> float:
        return statistics.median(a / b for a, b in pairs)

    versus_torchio = [a / b for a, b in zip(ours, torchio)]
    return {
        "vs TorchIO": statistics.median(versus_torchio),
        "vs TorchIO range": (min(versus_torchio), max(versus_torchio)),
        "LoadImaged vs TorchIO": median_of(zip(plain, torchio)),
        "vs our ceiling": median_of(zip(ours, our_ceilings)),
        "vs ceiling": median_of(zip(ours, ceilings)),
        "LoadImaged vs ceiling": median_of(zip(plain, ceilings)),
    }


def write_table(rows: list[dict], names: list[str], args: argparse.Namespace) -> None:
    lines = [
        f"patches/s over {args.epochs} epochs after a warm-up, median of {args.repeats} rounds (ratios: median of the "
        "rounds' ratios); "
        f"simulated step {args.step_ms:g} ms per batch of {BATCH}; torch threads in the training process: "
        f"{args.torch_threads} (OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}); "
        f"{'keep_freed_memory() in the training process; ' if args.keep_freed_memory else ''}"
        f"{'our loader without the raw NIfTI header fields (keep_header=False); ' if args.no_header else ''}"
        f"{f'{args.channels}-channel images; ' if args.channels > 1 else ''}"
        "our queue read through "
        f"{'torch DataLoader' if args.our_batches == 'torch' else 'MONAI ThreadDataLoader'}",
        "",
        "| data | sampler | ceiling: LoadImaged / ours | monai_patchqueue | (with LoadImaged) | TorchIO Queue "
        "| MONAI Dataset + crop | vs TorchIO [rounds] (with LoadImaged) "
        "| vs ceiling: ours / LoadImaged (with LoadImaged) "
        "| ceiling as the workers load: LoadImaged / ours | vs it: ours / LoadImaged (with LoadImaged) "
        "| wait after 1st batch (ours / TorchIO / MONAI) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        (ours_rate, ours_wait), (plain_rate, _), (tio_rate, tio_wait), (monai_rate, monai_wait) = (
            row[n] for n in names
        )
        ratios = row["ratios"]
        low, high = ratios["vs TorchIO range"]
        lines.append(
            f"| {row['format']} | {row['sampler']} | {row['ceiling']:.0f} / {row['our ceiling']:.0f} | {ours_rate:.0f} "
            f"| {plain_rate:.0f} | {tio_rate:.0f} | {monai_rate:.0f} "
            f"| {ratios['vs TorchIO']:.2f}x [{low:.2f}-{high:.2f}] ({ratios['LoadImaged vs TorchIO']:.2f}x) "
            f"| {ratios['vs our ceiling']:.0%} / {ratios['vs ceiling']:.0%} "
            f"({ratios['LoadImaged vs ceiling']:.0%}) "
            f"| {row['workers ceiling']:.0f} / {row['our workers ceiling']:.0f} "
            f"| {ratios['vs our ceiling as workers']:.0%} / {ratios['vs ceiling as workers']:.0%} "
            f"({ratios['LoadImaged vs ceiling as workers']:.0%}) "
            f"| {ours_wait:.1%} / {tio_wait:.1%} / {monai_wait:.1%} |"
        )
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_step{args.step_ms:g}ms" if args.step_ms else ""
    if (tuple(args.formats), tuple(args.samplers)) != (FORMATS, SAMPLERS):  # a partial run keeps the full tables
        suffix += "_partial"
    if args.torch_threads != 1:
        suffix += f"_threads{args.torch_threads}"
    if args.our_batches != "thread":
        suffix += f"_{args.our_batches}_dataloader"
    if args.keep_freed_memory:
        suffix += "_keep_freed_memory"
    if args.no_header:
        suffix += "_no_header"
    if args.channels > 1:
        suffix += f"_{args.channels}channels"
    (RESULTS / f"queue{suffix}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
