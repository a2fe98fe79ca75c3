"""The sampler demo: draw patches from the embedded brain with every sampler, summarise them, draw them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, LoadImaged, ScaleIntensityd

from .datasets import example_brain
from .datasets.brain import CLASS_NAMES
from .transforms import GridSamplerd, LabelSamplerd, UniformSamplerd, WeightedSamplerd

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def _load_brain() -> dict:
    loader = Compose([LoadImaged(["image", "label"], ensure_channel_first=True), ScaleIntensityd("image")])
    data = loader(example_brain())
    # Weighted sampling map: white matter three times as likely as grey matter, background never.
    data["weights"] = (data["label"] == 1).float() + 3.0 * (data["label"] == 2).float()
    return data


def _samplers(patch_size: int, num_samples: int, seed: int) -> dict[str, object]:
    keys = ["image", "label"]
    samplers = {
        "UniformSamplerd": UniformSamplerd(keys, patch_size, num_samples=num_samples),
        "WeightedSamplerd (WM 3 : GM 1)": WeightedSamplerd(keys, patch_size, "weights", num_samples=num_samples),
        "LabelSamplerd (1 : 1 : 1)": LabelSamplerd(
            keys, patch_size, "label", num_samples=num_samples, label_probabilities={0: 1, 1: 1, 2: 1}
        ),
    }
    for sampler in samplers.values():
        sampler.set_random_state(seed)
    samplers["GridSamplerd (overlap 8)"] = GridSamplerd(keys, patch_size, patch_overlap=8)
    return samplers


def _centre_classes(patches: Sequence[dict], patch_size: int) -> np.ndarray:
    """Return the tissue class at the centre voxel (``P // 2``) of each patch."""
    return np.array([int(p["label"][0, patch_size // 2, patch_size // 2, patch_size // 2]) for p in patches])


def _draw(image: torch.Tensor, results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    volume = image[0].numpy()
    z = volume.shape[2] // 2
    figure, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4.6))
    for axis, (name, patches) in zip(axes, results.items()):
        axis.imshow(volume[:, :, z].T, cmap="gray", origin="lower")
        for patch in patches:
            i0, j0, k0, i1, j1, k1 = (int(v) for v in patch["location"])
            if k0 <= z < k1:
                axis.add_patch(Rectangle((i0 - 0.5, j0 - 0.5), i1 - i0, j1 - j0, fill=False, lw=1.2,
                                         edgecolor=plt.cm.tab10(len(axis.patches) % 10)))  # fmt: skip
        axis.set_title(f"{name}\n{len(patches)} patches, boxes crossing z={z}", fontsize=9)
        axis.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_demo(output: Path, *, patch_size: int = 24, num_samples: int = 16, seed: int = 0) -> Path:
    """Draw patches from the embedded brain with each sampler, print a summary and save a PNG.

    Args:
        output: folder for ``patches.png`` (created if missing).
        patch_size: edge of the cubic patches.
        num_samples: patches per random sampler.
        seed: seed of the random samplers; the same seed gives the same patches.

    Returns:
        The path of the PNG.
    """
    data = _load_brain()
    shape = tuple(data["image"].shape[1:])
    print(f"example brain: image {tuple(data['image'].shape)}, tissue classes {list(CLASS_NAMES)}")
    present = np.bincount(data["label"].int().flatten().numpy(), minlength=3) / np.prod(shape)
    print("voxel share per class:  " + "  ".join(f"{n} {f:5.1%}" for n, f in zip(CLASS_NAMES, present)))
    results = {}
    for name, sampler in _samplers(patch_size, num_samples, seed).items():
        patches = sampler(data)
        results[name] = patches
        shares = np.bincount(_centre_classes(patches, patch_size), minlength=3) / len(patches)
        print(f"\n{name}: {len(patches)} patches of {patch_size}^3")
        for patch in patches[:3]:
            print(f"  location {patch['location'].tolist()}  world origin {patch['image'].affine[:3, 3].tolist()}")
        print("  centre class share:  " + "  ".join(f"{n} {f:5.1%}" for n, f in zip(CLASS_NAMES, shares)))
    output.mkdir(parents=True, exist_ok=True)
    path = output / "patches.png"
    _draw(data["image"], results, path)
    print(f"\nwrote {path.resolve()}")
    return path
