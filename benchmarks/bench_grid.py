"""Whole-volume inference time of GridInferer against MONAI's sliding window and TorchIO's grid, in one run.

A 192 x 192 x 160 volume, patch 96, overlap 16 voxels (1/6 for MONAI), batch 4, CPU, eval mode, no grad; three
networks: a small 3D UNet, a plain conv net and a 1x1x1 conv (whose cost is almost all overhead). Also timed:
the network on the 18 grid patches alone (the floor: no extraction, no aggregation) and the network on the
whole volume. Implementations run interleaved, median of the repeats.

Then the peak extra memory of each call: in a fresh process per call (Linux), after a warm-up call, the peak
resident set size is reset (``/proc/self/clear_refs``) and the call's peak above the resident size before it
is read from ``VmHWM``. glibc's mmap threshold is pinned low so that freed tensors go back to the system and
every call's buffers show up in its peak. The allowance is what issue 4 grants GridInferer: the output, a
one-channel weight buffer and one batch of patches on top of what the network needs for one batch (the
floor's peak).

    python benchmarks/bench_grid.py [--repeats 5] [--no-memory]   # writes benchmarks/results/grid.md
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchio as tio
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from monai_patchqueue import GridInferer
from monai_patchqueue.locations import grid_locations

SHAPE = (192, 192, 160)
PATCH = 96
OVERLAP = 16
BATCH = 4
TOLERANCE = 2**20  # 1 MiB of measurement granularity (pages, Python objects) in the memory verdicts


def networks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    unet = UNet(3, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    plain = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(8, 3, 1),
    )  # fmt: skip
    pointwise = torch.nn.Conv3d(1, 3, 1)  # almost free: shows each implementation's own overhead
    return {"small 3D UNet": unet.eval(), "plain conv net": plain.eval(), "1x1x1 conv": pointwise.eval()}


def torchio_grid(image: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
    subject = tio.Subject(image=tio.ScalarImage(tensor=image[0]))
    sampler = tio.GridSampler(subject, patch_size=PATCH, patch_overlap=OVERLAP)
    aggregator = tio.GridAggregator(sampler, overlap_mode="crop")
    for batch in torch.utils.data.DataLoader(sampler, batch_size=BATCH):
        aggregator.add_batch(network(batch["image"][tio.DATA]), batch[tio.LOCATION])
    return aggregator.get_output_tensor()[None]


def patches_alone(patches: torch.Tensor, network: torch.nn.Module) -> None:
    for start in range(0, len(patches), BATCH):
        network(patches[start : start + BATCH])


def implementations(image: torch.Tensor, network: torch.nn.Module) -> dict[str, Callable[[], object]]:
    locations = grid_locations(SHAPE, (PATCH,) * 3, (OVERLAP,) * 3)
    patches = torch.stack([image[0][:, a:d, b:e, c:f] for a, b, c, d, e, f in locations.tolist()])
    ours_crop = GridInferer(PATCH, OVERLAP, overlap_mode="crop", batch_size=BATCH)
    ours_hann = GridInferer(PATCH, OVERLAP, overlap_mode="hann", batch_size=BATCH)
    return {
        "GridInferer crop": lambda: ours_crop(image, network),
        "GridInferer hann": lambda: ours_hann(image, network),
        "MONAI sliding_window_inference (constant)": lambda: sliding_window_inference(
            image, PATCH, BATCH, network, overlap=OVERLAP / PATCH, mode="constant"
        ),
        "TorchIO GridSampler + GridAggregator (crop)": lambda: torchio_grid(image, network),
        "network on the patches alone (floor)": lambda: patches_alone(patches, network),
        "network on the whole volume": lambda: network(image),
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status")


def peak_extra_bytes(network_name: str, implementation: str) -> int:
    """Run one implementation twice in this (fresh) process; return the second call's peak RSS above its start."""
    image = torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(0))
    call = implementations(image, networks()[network_name])[implementation]
    with torch.no_grad():
        call()  # warm-up: one-off buffers of the libraries
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
        result = call()
        peak = _status_kib("VmHWM")
    del result
    return (peak - before) * 1024


def memory_table() -> list[str]:
    """Peak extra memory per implementation, each in a fresh process, against GridInferer's allowance."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned processes' glibc at start-up
    context = multiprocessing.get_context("spawn")
    voxels, patch_voxels = SHAPE[0] * SHAPE[1] * SHAPE[2], PATCH**3
    lines = [
        "",
        f"Peak extra memory (MiB) of one call, fresh process per call; allowance for GridInferer: the floor's peak "
        f"+ output ({3 * voxels * 4 / 2**20:.1f}) + one-channel weights ({voxels * 4 / 2**20:.1f}) + one batch of "
        f"input patches ({BATCH * patch_voxels * 4 / 2**20:.1f}); weighted modes also hold a one-patch blending window "
        f"({patch_voxels * 4 / 2**20:.1f}); verdicts allow 1 MiB of measurement granularity.",
        "",
        "| network | implementation | peak extra MiB | GridInferer's allowance MiB | within it |",
        "|---|---|---|---|---|",
    ]
    names = list(implementations(torch.zeros(1, 1, *SHAPE), torch.nn.Identity()))
    for network_name in networks():
        peaks = {}
        for name in names:
            with context.Pool(1) as pool:
                peaks[name] = pool.apply(peak_extra_bytes, (network_name, name))
        allowance = peaks["network on the patches alone (floor)"] + (4 * voxels + BATCH * patch_voxels) * 4
        for name, peak in peaks.items():
            if name.startswith("GridInferer"):
                limit = allowance + (0 if name.endswith("crop") else patch_voxels * 4)  # + the one-patch window
                verdict = "yes" if peak <= limit + TOLERANCE else "**no**"
                limit_text = f"{limit / 2**20:.1f}"
            else:
                verdict = limit_text = ""
            row = f"| {network_name} | {name} | {peak / 2**20:.1f} | {limit_text} | {verdict} |"
            print(row, flush=True)
            lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, *SHAPE, generator=generator)
    lines = [
        f"Seconds per volume, {SHAPE} image, patch {PATCH}, overlap {OVERLAP}, batch {BATCH}, CPU "
        f"({torch.get_num_threads()} threads), median of {args.repeats} interleaved runs.",
        "",
        "| network | implementation | seconds | vs GridInferer crop |",
        "|---|---|---|---|",
    ]
    for network_name, network in networks().items():
        calls = implementations(image, network)
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad():
            for call in calls.values():
                call()  # warm-up
            for _ in range(args.repeats):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in times.items()}
        ours = medians["GridInferer crop"]
        for name, seconds in medians.items():
            row = f"| {network_name} | {name} | {seconds:.3f} | {ours / seconds:.2f}x |"
            print(row, flush=True)
            lines.append(row)
    if not args.no_memory:
        lines += memory_table()
    table = "\n".join(lines)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "grid.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
