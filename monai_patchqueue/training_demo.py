"""The training demo: a 3D UNet learns tissue segmentation of the embedded brain from queued patches.

``LabelSamplerd`` + :class:`PatchQueueDataset` feed a small MONAI UNet with patches of the brain's left
hemisphere only; :class:`GridInferer` then segments the whole volume, and the demo scores the right hemisphere,
which no training patch came from. It prints per-class Dice there (and what guessing by class frequency would
score), patches per second and the share of time the loop waited for data, and writes the prediction (NIfTI,
with the source affine) and a PNG of three orthogonal slices.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import ThreadDataLoader
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    LoadImaged,
    RandGaussianNoised,
    RandScaleIntensityd,
    ScaleIntensityd,
    SpatialCropd,
)
from tqdm.auto import tqdm

from .data import PatchQueueDataset
from .datasets import example_brain
from .datasets.brain import CLASS_NAMES
from .inferers import GridInferer
from .transforms import LabelSamplerd

__all__ = ["TrainingReport", "run_training_demo"]

BATCH_SIZE = 4
AUGMENTED_COPIES = 8  # the embedded data is one brain: each epoch visits it 8 times with fresh augmentation
LEFT_RIGHT_AXIS = 0  # the embedded brain is RAS: its first voxel axis runs from left to right


def hemispheres(size: int) -> tuple[slice, slice]:
    """Return the voxel ranges along the left-right axis of the training (left) and held-out (right) sides.

    The middle voxel plane (or the two middle ones for an even ``size``) belongs to neither side.

    Example:
        >>> hemispheres(73), hemispheres(6)
        ((slice(0, 36, None), slice(37, 73, None)), (slice(0, 2, None), slice(4, 6, None)))
    """
    half = (size - 1) // 2
    return slice(0, half), slice(size - half, size)


class TrainingReport(dict):
    """What the demo measured: ``dice`` and ``chance_dice`` per class on the held-out right hemisphere,
    ``loss``, ``patches_per_s``, ``wait_share``."""


def _brain() -> dict:
    return Compose([LoadImaged(["image", "label"], ensure_channel_first=True), ScaleIntensityd("image")])(
        example_brain()
    )


def _network(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng():  # seed the weights without touching the caller's global generator
        torch.manual_seed(seed)
        return UNet(3, 1, len(CLASS_NAMES), channels=(16, 32, 64), strides=(2, 2), num_res_units=1)


def _dice(prediction: torch.Tensor, label: torch.Tensor) -> list[float]:
    scores = []
    for value in range(len(CLASS_NAMES)):
        predicted, true = prediction == value, label == value
        scores.append(float(2 * (predicted & true).sum() / max(int(predicted.sum() + true.sum()), 1)))
    return scores


def _train(queue: PatchQueueDataset, network, iterations: int, device: torch.device) -> tuple[float, float, float]:
    """Train for ``iterations`` batches; return the last loss, patches per second and the share spent waiting."""
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=5e-3)
    loader = ThreadDataLoader(queue, batch_size=BATCH_SIZE, buffer_size=2)
    network.train()
    done, patches, waited, loss_value = 0, 0, 0.0, float("nan")
    start = time.perf_counter()
    with tqdm(total=iterations, desc="training", unit="batch") as bar:
        while done < iterations:
            batches = iter(loader)
            while done < iterations:
                asked = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                waited += time.perf_counter() - asked
                optimizer.zero_grad()
                loss = loss_function(network(batch["image"].to(device)), batch["label"].to(device))
                loss.backward()
                loss = loss.detach()
                optimizer.step()
                done, patches, loss_value = done + 1, patches + len(batch["image"]), loss.item()
                bar.set_postfix(
                    loss=f"{loss_value:.3f}", patches_per_s=f"{patches / (time.perf_counter() - start):.0f}"
                )
                bar.update()
    elapsed = time.perf_counter() - start
    return loss_value, patches / elapsed, waited / elapsed


def _draw(image: torch.Tensor, label: torch.Tensor, prediction: torch.Tensor, held_out: slice, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = {"image": image[0].numpy(), "label": label[0].numpy(), "prediction": prediction[0].numpy()}
    centre = [size // 2 for size in volumes["image"].shape]
    centre[LEFT_RIGHT_AXIS] = (held_out.start + held_out.stop) // 2  # the sagittal slice: in the held-out side
    views = {
        "sagittal, right": lambda v: v[centre[0]],
        "coronal": lambda v: v[:, centre[1]],
        "axial": lambda v: v[:, :, centre[2]],
    }
    figure, axes = plt.subplots(3, 3, figsize=(9, 9))
    for row, (name, volume) in enumerate(volumes.items()):
        for column, (view, cut) in enumerate(views.items()):
            axis = axes[row, column]
            options = {"cmap": "gray"} if name == "image" else {"cmap": "viridis", "vmin": 0, "vmax": 2}
            axis.imshow(cut(volume).T, origin="lower", **options)
            if column > 0:  # left-right runs across these views: mark where the held-out side starts
                axis.axvline(held_out.start - 0.5, color="white", linestyle="--", linewidth=0.8)
            axis.set_title(f"{name}, {view}", fontsize=9)
            axis.set_axis_off()
    figure.suptitle("training patches: left hemisphere only; right of the dashed line: held out", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_training_demo(
    output: Path,
    *,
    iterations: int = 600,
    patch_size: int = 32,
    samples_per_volume: int = 16,
    workers: int = 1,
    device: str = "cpu",
    seed: int = 0,
) -> TrainingReport:
    """Train a UNet on queued patches of the embedded brain's left hemisphere, segment the whole brain with
    GridInferer, score the held-out right hemisphere, report and save.

    Args:
        output: folder for ``prediction.nii.gz`` and ``segmentation.png`` (created if missing).
        iterations: training batches of 4 patches.
        patch_size: edge of the cubic patches (at most 36, the left-right extent of the training hemisphere).
        samples_per_volume: patches per augmented copy of the brain.
        workers: background processes of the queue (0: in this process).
        device: torch device for training and inference, e.g. "cpu" or "cuda".
        seed: seeds the network, the queue and the augmentation; the same seed gives the same result.

    Returns:
        The measured :class:`TrainingReport`.

    Raises:
        ValueError: ``patch_size`` exceeds the training hemisphere.
    """
    torch_device = torch.device(device)
    brain = _brain()
    spatial_shape = tuple(brain["image"].shape[1:])
    training_side, held_out = hemispheres(spatial_shape[LEFT_RIGHT_AXIS])
    if patch_size > training_side.stop:
        raise ValueError(
            f"patch_size {patch_size} exceeds the left-right extent of the training hemisphere "
            f"({training_side.stop} voxels)"
        )
    roi_end = list(spatial_shape)
    roi_end[LEFT_RIGHT_AXIS] = training_side.stop
    left = SpatialCropd(["image", "label"], roi_start=[0, 0, 0], roi_end=roi_end)(brain)
    augment = Compose([
        RandScaleIntensityd("image", factors=0.1, prob=1.0),
        RandGaussianNoised("image", prob=0.5, std=0.02),
    ])  # fmt: skip
    sampler = LabelSamplerd(["image", "label"], patch_size, "label", label_probabilities={0: 1, 1: 1, 2: 1})
    data = [{"image": left["image"], "label": left["label"]} for _ in range(AUGMENTED_COPIES)]
    network = _network(seed).to(torch_device)
    with PatchQueueDataset(data, sampler, 4 * samples_per_volume, samples_per_volume, transform=augment,
                           num_workers=workers, seed=seed) as queue:  # fmt: skip
        loss, patches_per_s, wait_share = _train(queue, network, iterations, torch_device)
    network.eval()
    inferer = GridInferer(patch_size, patch_overlap=2 * (patch_size // 8), overlap_mode="hann", batch_size=BATCH_SIZE)
    with torch.no_grad():
        logits = inferer(brain["image"][None].to(torch_device), network)
    prediction = logits.argmax(1).cpu().to(torch.uint8)
    label = brain["label"][0].to(torch.uint8)
    scored = (slice(None),) * LEFT_RIGHT_AXIS + (held_out,)
    frequencies = np.bincount(label[scored].flatten().numpy(), minlength=len(CLASS_NAMES)) / label[scored].numel()
    report = TrainingReport(
        dice=_dice(prediction[0][scored], label[scored]), chance_dice=frequencies.tolist(), loss=loss,
        patches_per_s=patches_per_s, wait_share=wait_share,
    )  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    affine = brain["image"].affine.numpy()
    nib.save(nib.Nifti1Image(prediction[0].numpy(), affine), output / "prediction.nii.gz")
    _draw(brain["image"], brain["label"], prediction, held_out, output / "segmentation.png")
    _print(report, output)
    return report


def _print(report: TrainingReport, output: Path) -> None:
    print(f"\nlast training loss {report['loss']:.3f}; {report['patches_per_s']:.0f} patches/s; "
          f"the loop waited for data {report['wait_share']:.1%} of the time")  # fmt: skip
    print("Dice per class on the right hemisphere, which no training patch came from")
    print("(chance: guessing each voxel by the class frequencies there):")
    for name, dice, chance in zip(CLASS_NAMES, report["dice"], report["chance_dice"]):
        print(f"  {name:12s} {dice:.3f}   (chance {chance:.3f})")
    print(f"wrote {(output / 'prediction.nii.gz').resolve()} and {(output / 'segmentation.png').resolve()}")
    print(f"outputs are in {output.resolve()}")
