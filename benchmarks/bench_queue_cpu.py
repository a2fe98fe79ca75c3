"""CPU time per patch of PatchQueueDataset, split between the training process and the queue's workers.

Same data and settings as ``bench_queue.py`` (it reuses that module's subjects and queue), one format and sampler
per run. After the run it times loading alone (CPU per subject, in a process forked as the workers start) and prints
what the queue spends per patch beyond loading. The training process is fresh: nothing large was allocated in it
before the workers start, as in a training script that builds its queue first. With ``--default-worker-allocator``
the workers keep glibc's defaults instead of :func:`monai_patchqueue.keep_freed_memory`, to measure what that does
(and with ``--no-worker-gc-freeze`` their garbage collections walk every object inherited from this process); with
``--keep-freed-memory`` the training process calls it too (as a training script may), which spares the collation of
every batch from faulting in fresh pages. With ``--no-track-meta`` MONAI's metadata tracking is off
(``set_track_meta(False)``, inherited by the forked workers): patches and batches are plain tensors, to measure what
the per-patch MetaTensors cost.

    python benchmarks/bench_queue_cpu.py [--format .nii] [--sampler uniform] [--epochs 3] [--torch-threads 1]
        [--default-worker-allocator] [--no-worker-gc-freeze] [--keep-freed-memory] [--no-track-meta]
        [--step-ms 0] [--our-batches thread] [--no-header] [--loadimaged] [--channels 1]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import bench_queue
import torch
from monai.data import set_track_meta

from monai_patchqueue import keep_freed_memory
from monai_patchqueue.data import worker_memory


def _stat_fields(stat: Path) -> list[str] | None:
    """The fields of a /proc ``stat`` file after the command name (state, parent pid, ...), or None when the
    process or thread has ended."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cpu_seconds(fields: list[str]) -> float:
    """User + system CPU seconds from a /proc ``stat`` file's fields."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live child processes (the queue's workers)."""
    me, total = os.getpid(), 0.0
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(entry / "stat") if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == me:
            total += _cpu_seconds(fields)
    return total


def queue_thread_cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds of this process's live threads named after the queue (its unpacking and
    serving threads), by name."""
    seconds: dict[str, float] = {}
    for thread in threading.enumerate():
        if not thread.name.startswith("PatchQueueDataset") or thread.native_id is None:
            continue
        fields = _stat_fields(Path(f"/proc/self/task/{thread.native_id}/stat"))
        if fields is not None:
            seconds[thread.name] = seconds.get(thread.name, 0.0) + _cpu_seconds(fields)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=bench_queue.FORMATS, default=".nii")
    parser.add_argument("--sampler", choices=bench_queue.SAMPLERS, default="uniform")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--default-worker-allocator", action="store_true")
    parser.add_argument(
        "--no-worker-gc-freeze", action="store_true", help="workers' collections walk what they inherited"
    )
    parser.add_argument("--keep-freed-memory", action="store_true", help="call keep_freed_memory() here too")
    parser.add_argument("--no-track-meta", action="store_true", help="set_track_meta(False): plain tensor patches")
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulated training step per batch of 8")
    parser.add_argument("--our-batches", choices=("thread", "torch"), default="thread")
    parser.add_argument("--no-header", action="store_true", help="LoadMappedNiftid(keep_header=False)")
    parser.add_argument(
        "--loadimaged", action="store_true", help="load with MONAI's LoadImaged, as bench_queue.py's second column"
    )
    parser.add_argument("--channels", type=int, default=1, help="image channels (above 1: 4-D images)")
    parser.add_argument("--data", type=Path, default=bench_queue.RESULTS / "queue_data")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.default_worker_allocator:
        worker_memory.keep_freed_memory = lambda *_: False  # read by start_worker in each worker
    if args.no_worker_gc_freeze:
        worker_memory.freeze_inherited_objects = lambda: 0  # read by start_worker in each worker
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.no_track_meta:
        set_track_meta(False)  # before the queue forks its workers, which inherit it
    datalist = bench_queue.make_subjects(args.data, args.format, args.channels)
    load = bench_queue.loader_for(args.format) if args.loadimaged else bench_queue.mapped_loader(not args.no_header)
    contender = bench_queue.ours(datalist, args.sampler, load, args.our_batches)
    step_s = args.step_ms / 1e3
    bench_queue.consume(contender.loader, step_s)  # warm-up epoch: workers started, files in the page cache
    wall, training, workers, patches = time.perf_counter(), time.process_time(), children_cpu_seconds(), 0
    queue_threads = queue_thread_cpu_seconds()
    waited = 0.0
    for _ in range(args.epochs):
        epoch_patches, epoch_waited = bench_queue.consume(contender.loader, step_s)
        patches, waited = patches + epoch_patches, waited + epoch_waited
    wall, training = time.perf_counter() - wall, time.process_time() - training
    workers = children_cpu_seconds() - workers
    threads = {name: cpu - queue_threads.get(name, 0.0) for name, cpu in queue_thread_cpu_seconds().items()}
    contender.close()
    allocator = "glibc defaults" if args.default_worker_allocator else "keep_freed_memory"
    here = "keep_freed_memory" if args.keep_freed_memory else "glibc defaults"
    channels = f", {args.channels}-channel images" if args.channels > 1 else ""
    print(
        f"{args.format} {args.sampler}{channels}, torch threads {args.torch_threads}, worker allocator: {allocator}, "
        f"training process allocator: {here}, worker gc freeze: {'off' if args.no_worker_gc_freeze else 'on'}, "
        f"metadata {'off' if args.no_track_meta else 'tracked'}{', no raw header' if args.no_header else ''}, "
        f"loader {'LoadImaged' if args.loadimaged else 'LoadMappedNiftid'}, "
        f"step {args.step_ms:g} ms, {args.our_batches} batches: "
        f"{patches / wall:.0f} patches/s, waited {waited / wall:.1%} after each epoch's first batch; "
        f"CPU per patch {training / patches * 1e3:.2f} ms training process + "
        f"{workers / patches * 1e3:.2f} ms workers = {(training + workers) / patches * 1e3:.2f} ms"
    )
    rest = training - sum(threads.values())
    split = ", ".join(f"{cpu / patches * 1e3:.2f} ms {name.removeprefix('PatchQueueDataset ')} thread"
                      for name, cpu in sorted(threads.items()))  # fmt: skip
    print(
        f"training process per patch: {split or 'no queue threads'}, {rest / patches * 1e3:.2f} ms the rest "
        "(the loop and the loader's threads: collation)"
    )
    loading = bench_queue.load_seconds_as_workers(datalist, load, clock=time.process_time)
    loading_per_patch = loading / bench_queue.SAMPLES_PER_VOLUME
    print(
        f"loading alone, as a worker loads (after the run): {loading * 1e3:.1f} ms of CPU per subject, "
        f"{loading_per_patch * 1e3:.2f} ms per patch; the queue's CPU per patch beyond loading: "
        f"{((training + workers) / patches - loading_per_patch) * 1e3:.2f} ms "
        f"({(workers / patches - loading_per_patch) * 1e3:.2f} ms in the workers)"
    )


if __name__ == "__main__":
    main()
