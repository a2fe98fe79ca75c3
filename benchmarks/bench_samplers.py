"""Per-call time of the patch samplers against TorchIO's samplers and MONAI's random crops, in one run.

Each call draws 16 patches of 64^3 from an image and its 3-class label (both cropped). Two cases: a
192 x 192 x 160 volume and a 512 x 512 x 256 one. Implementations run interleaved (round robin), and the
median per-call time is reported with the ratio "faster reference / ours" (above 1: ours is faster).

    python benchmarks/bench_samplers.py            # both cases, writes benchmarks/results/samplers.md
    python benchmarks/bench_samplers.py --quick    # the small case only, fewer repeats
    python benchmarks/bench_samplers.py --keep-freed-memory   # writes benchmarks/results/samplers_keep_freed_memory.md

Every call allocates its patches afresh (16 image and label crops, about 20 MB); with glibc's default settings
those allocations are often new pages from the system, whose faults can cost more than the crops themselves on
a machine with slow page faults. ``--keep-freed-memory`` calls :func:`monai_patchqueue.keep_freed_memory` first
(as the patch queue's workers do), so that every implementation reuses freed memory and the table compares the
samplers' own work.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from monai.data import MetaTensor
from monai.transforms import RandCropByLabelClassesd, RandSpatialCropSamplesd, RandWeightedCropd

from monai_patchqueue import LabelSamplerd, UniformSamplerd, WeightedSamplerd, keep_freed_memory

PATCH = 64
NUM_PATCHES = 16
KEYS = ["image", "label"]
RATIOS = {0: 1.0, 1: 1.0, 2: 1.0}


def make_volume(shape: tuple[int, int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """An image with a nested 3-class label: background, a thick shell (1) and a smaller core (2)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand((1, *shape), generator=generator)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = grid.pow(2).sum(0).sqrt()
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    label[0][radius < 0.8] = 1
    label[0][radius < 0.35] = 2
    weights = (label.float() + 0.5) * (radius < 0.9)
    affine = torch.diag(torch.tensor([1.0, 1.0, 1.2, 1.0], dtype=torch.float64))
    return {
        "image": MetaTensor(image, affine=affine),
        "label": MetaTensor(label, affine=affine),
        "weights": MetaTensor(weights, affine=affine),
    }


def implementations(data: dict) -> dict[str, dict[str, Callable[[], list]]]:
    """Per sampler kind, a zero-argument call per implementation, each returning 16 patches."""
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=data["image"].as_tensor(), affine=data["image"].affine.numpy()),
        label=tio.LabelMap(tensor=data["label"].as_tensor(), affine=data["label"].affine.numpy()),
        weights=tio.Image(tensor=data["weights"].as_tensor(), affine=data["weights"].affine.numpy(),
                          type=tio.SAMPLING_MAP),
    )  # fmt: skip
    torchio_uniform = tio.UniformSampler(PATCH)
    torchio_weighted = tio.WeightedSampler(PATCH, "weights")
    torchio_label = tio.LabelSampler(PATCH, "label", label_probabilities=RATIOS)
    monai_uniform = RandSpatialCropSamplesd(KEYS, PATCH, num_samples=NUM_PATCHES, random_size=False)
    monai_weighted = RandWeightedCropd(KEYS, "weights", (PATCH,) * 3, num_samples=NUM_PATCHES)
    monai_label = RandCropByLabelClassesd(KEYS, "label", PATCH, ratios=list(RATIOS.values()), num_classes=3,
                                          num_samples=NUM_PATCHES)  # fmt: skip
    ours_uniform = UniformSamplerd(KEYS, PATCH, num_samples=NUM_PATCHES)
    ours_weighted = WeightedSamplerd(KEYS, PATCH, "weights", num_samples=NUM_PATCHES)
    ours_label = LabelSamplerd(KEYS, PATCH, "label", num_samples=NUM_PATCHES, label_probabilities=RATIOS)
    for transform in (monai_uniform, monai_weighted, monai_label, ours_uniform, ours_weighted, ours_label):
        transform.set_random_state(0)
    torch.manual_seed(0)
    return {
        "uniform": {
            "monai_patchqueue UniformSamplerd": lambda: ours_uniform(data),
            "TorchIO UniformSampler": lambda: list(torchio_uniform(subject, num_patches=NUM_PATCHES)),
            "MONAI RandSpatialCropSamplesd": lambda: monai_uniform(data),
        },
        "weighted": {
            "monai_patchqueue WeightedSamplerd": lambda: ours_weighted(data),
            "TorchIO WeightedSampler": lambda: list(torchio_weighted(subject, num_patches=NUM_PATCHES)),
            "MONAI RandWeightedCropd": lambda: monai_weighted(data),
        },
        "label": {
            "monai_patchqueue LabelSamplerd": lambda: ours_label(data),
            "TorchIO LabelSampler": lambda: list(torchio_label(subject, num_patches=NUM_PATCHES)),
            "MONAI RandCropByLabelClassesd": lambda: monai_label(data),
        },
    }


def time_interleaved(calls: dict[str, Callable[[], list]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each implementation, run round robin after one warm-up call each."""
    for call in calls.values():
        assert len(call()) == NUM_PATCHES
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(shapes: list[tuple[int, int, int]], repeats: int, kept_freed_memory: bool = False) -> str:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = [
        f"Per-call time, {NUM_PATCHES} patches of {PATCH}^3 from an image and its label, median of {repeats} "
        f"interleaved calls (torch {torch.__version__}, {torch.get_num_threads()} threads"
        f"{', keep_freed_memory()' if kept_freed_memory else ''}).",
        "",
        "| volume | sampler | monai_patchqueue | TorchIO | MONAI | speed-up vs faster reference |",
        "|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        data = make_volume(shape)
        for kind, calls in implementations(data).items():
            medians = time_interleaved(calls, repeats)
            ours, torchio_time, monai_time = medians.values()
            ratio = min(torchio_time, monai_time) / ours
            row = (f"| {'x'.join(map(str, shape))} | {kind} | {ours * 1e3:.1f} ms | {torchio_time * 1e3:.1f} ms | "
                   f"{monai_time * 1e3:.1f} ms | {ratio:.1f}x |")  # fmt: skip
            print(row, flush=True)
            lines.append(row)
        del data
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small volume only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="calls per implementation (default 7, quick 3)")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="have glibc reuse freed memory for every implementation"
    )
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    shapes = [(192, 192, 160)] if args.quick else [(192, 192, 160), (512, 512, 256)]
    table = run(shapes, args.repeats or (3 if args.quick else 7), args.keep_freed_memory)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"samplers{'_keep_freed_memory' if args.keep_freed_memory else ''}.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
