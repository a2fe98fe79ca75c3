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

With ``--device cuda`` the image and the networks live on the GPU and every implementation runs there, except
TorchIO's aggregator, which accumulates on the CPU by design (its patches are cut from the CPU image and moved
to the GPU per batch, as in TorchIO's tutorials); two more rows keep the output in CPU memory
(``device="cpu"``), as for volumes whose output does not fit the GPU. The memory table then reports each call's
peak GPU memory above what was allocated before it (torch's allocator statistics) instead of resident memory.

    python benchmarks/bench_grid.py [--repeats 5] [--no-memory] [--device cuda]   # writes results/grid[-cuda].md
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
VOXELS, PATCH_VOXELS = SHAPE[0] * SHAPE[1] * SHAPE[2], PATCH**3
MEMORY_TABLE_HEAD = [
    "",
    "| network | implementation | peak extra MiB | GridInferer's allowance MiB | within it |",
    "|---|---|---|---|---|",
]


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


def torchio_grid(image: torch.Tensor, network: torch.nn.Module, device: torch.device) -> torch.Tensor:
    subject = tio.Subject(image=tio.ScalarImage(tensor=image[0].cpu()))
    sampler = tio.GridSampler(subject, patch_size=PATCH, patch_overlap=OVERLAP)
    aggregator = tio.GridAggregator(sampler, overlap_mode="crop")
    for batch in torch.utils.data.DataLoader(sampler, batch_size=BATCH):
        aggregator.add_batch(network(batch["image"][tio.DATA].to(device)), batch[tio.LOCATION])
    return aggregator.get_output_tensor()[None]


def patches_alone(patches: torch.Tensor, network: torch.nn.Module) -> None:
    for start in range(0, len(patches), BATCH):
        network(patches[start : start + BATCH])


def implementations(image: torch.Tensor, network: torch.nn.Module) -> dict[str, Callable[[], object]]:
    """The calls to time, on the device that ``image`` and ``network`` are on."""
    locations = grid_locations(SHAPE, (PATCH,) * 3, (OVERLAP,) * 3)
    patches = torch.stack([image[0][:, a:d, b:e, c:f] for a, b, c, d, e, f in locations.tolist()])
    ours_crop = GridInferer(PATCH, OVERLAP, overlap_mode="crop", batch_size=BATCH)
    ours_hann = GridInferer(PATCH, OVERLAP, overlap_mode="hann", batch_size=BATCH)
    calls = {
        "GridInferer crop": lambda: ours_crop(image, network),
        "GridInferer hann": lambda: ours_hann(image, network),
        "MONAI sliding_window_inference (constant)": lambda: sliding_window_inference(
            image, PATCH, BATCH, network, overlap=OVERLAP / PATCH, mode="constant"
        ),
        "TorchIO GridSampler + GridAggregator (crop)": lambda: torchio_grid(image, network, image.device),
        "network on the patches alone (floor)": lambda: patches_alone(patches, network),
        "network on the whole volume": lambda: network(image),
    }
    if image.device.type != "cpu":
        to_cpu = GridInferer(PATCH, OVERLAP, overlap_mode="crop", batch_size=BATCH, device="cpu")
        calls["GridInferer crop, output on the CPU"] = lambda: to_cpu(image, network)
        calls["MONAI sliding_window_inference (constant), output on the CPU"] = lambda: sliding_window_inference(
            image, PATCH, BATCH, network, overlap=OVERLAP / PATCH, mode="constant", device="cpu"
        )
    return calls


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer brackets the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_memory_table(image: torch.Tensor) -> list[str]:
    """Peak GPU memory of one call above what was allocated before it, per network and implementation."""
    lines = [
        "",
        f"Peak extra GPU memory (MiB) of one call after a warm-up (torch.cuda.max_memory_allocated); "
        f"{allowance_text()}; outputs kept on the CPU count nothing there; verdicts allow 1 MiB of allocator "
        "granularity.",
        *MEMORY_TABLE_HEAD,
    ]
    for network_name, network in networks().items():
        peaks = {}
        for name, call in implementations(image, network.to(image.device)).items():
            with torch.no_grad():
                call()
                synchronize(image.device)
                torch.cuda.reset_peak_memory_stats(image.device)
                before = torch.cuda.memory_allocated(image.device)
                result = call()
                synchronize(image.device)
                peaks[name] = torch.cuda.max_memory_allocated(image.device) - before
            del result
        lines += memory_rows(network_name, peaks)
    return lines


def allowance_text() -> str:
    """GridInferer's memory allowance (what :func:`memory_rows` checks) in words, with its parts in MiB."""
    return (
        f"allowance for GridInferer: the floor's peak + output ({3 * VOXELS * 4 / 2**20:.1f}) + one-channel weights "
        f"({VOXELS * 4 / 2**20:.1f}) + one batch of input patches ({BATCH * PATCH_VOXELS * 4 / 2**20:.1f}); "
        f"weighted modes also hold a one-patch blending window ({PATCH_VOXELS * 4 / 2**20:.1f})"
    )


def memory_rows(network_name: str, peaks: dict[str, int]) -> list[str]:
    """Print and return one network's memory rows, each GridInferer peak against its allowance: the floor's peak
    plus the output, a one-channel weight buffer and one batch of input patches, and a one-patch blending window
    in the weighted modes; the verdicts allow ``TOLERANCE`` of measurement granularity."""
    allowance = peaks["network on the patches alone (floor)"] + (4 * VOXELS + BATCH * PATCH_VOXELS) * 4
    rows = []
    for name, peak in peaks.items():
        limit = allowance + (PATCH_VOXELS * 4 if "hann" in name else 0)
        verdict = ("yes" if peak <= limit + TOLERANCE else "**no**") if name.startswith("GridInferer") else ""
        limit_text = f"{limit / 2**20:.1f}" if verdict else ""
        rows.append(f"| {network_name} | {name} | {peak / 2**20:.1f} | {limit_text} | {verdict} |")
        print(rows[-1], flush=True)
    return rows


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
    lines = [
        "",
        f"Peak extra memory (MiB) of one call, fresh process per call; {allowance_text()}; verdicts allow 1 MiB of "
        "measurement granularity.",
        *MEMORY_TABLE_HEAD,
    ]
    names = list(implementations(torch.zeros(1, 1, *SHAPE), torch.nn.Identity()))
    for network_name in networks():
        peaks = {}
        for name in names:
            with context.Pool(1) as pool:
                peaks[name] = pool.apply(peak_extra_bytes, (network_name, name))
        lines += memory_rows(network_name, peaks)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--device", default="cpu", help="where the image and the networks live: cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, *SHAPE, generator=generator).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [
        f"Seconds per volume, {SHAPE} image, patch {PATCH}, overlap {OVERLAP}, batch {BATCH}, {where}, "
        f"median of {args.repeats} interleaved runs.",
        "",
        "| network | implementation | seconds | vs GridInferer crop |",
        "|---|---|---|---|",
    ]
    for network_name, network in networks().items():
        calls = implementations(image, network.to(device))
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad():
            for call in calls.values():
                call()  # warm-up
            for _ in range(args.repeats):
                for name, call in calls.items():
                    synchronize(device)
                    start = time.perf_counter()
                    call()
                    synchronize(device)
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in times.items()}
        ours = medians["GridInferer crop"]
        for name, seconds in medians.items():
            row = f"| {network_name} | {name} | {seconds:.3f} | {ours / seconds:.2f}x |"
            print(row, flush=True)
            lines.append(row)
    if not args.no_memory:
        lines += memory_table() if device.type == "cpu" else gpu_memory_table(image)
    table = "\n".join(lines)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / ("grid.md" if device.type == "cpu" else f"grid-{device.type}.md")).write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
