"""Derive the embedded example brain from the MNI ICBM152 2009 template shipped in nilearn's wheel.

Run once by a maintainer (``pip install nilearn`` first); the outputs are committed under
``monai_patchqueue/datasets/mni152/`` and nilearn is never needed at run time:

    python scripts/make_example_brain.py

The 1 mm template (T1 and grey/white-matter probability maps) is averaged over 2 x 2 x 2 blocks to 2 mm,
cropped to the bounding box of the head, and a 3-class tissue label is derived: a voxel whose grey + white
matter probability is at least 0.5 is grey matter (1) if its grey-matter probability is at least its
white-matter probability, else white matter (2); every other voxel is background (0).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

OUT = Path(__file__).resolve().parents[1] / "monai_patchqueue" / "datasets" / "mni152"
TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def _template(name: str) -> nib.Nifti1Image:
    import nilearn.datasets

    return nib.load(Path(nilearn.datasets.__file__).parent / "data" / TEMPLATE.format(name))


def _downsample(volume: np.ndarray) -> np.ndarray:
    even = tuple(slice(0, 2 * (n // 2)) for n in volume.shape)
    cropped = volume[even]
    blocks = [n // 2 for n in cropped.shape]
    return cropped.reshape(blocks[0], 2, blocks[1], 2, blocks[2], 2).mean(axis=(1, 3, 5))


def main() -> None:
    t1_image = _template("t1")
    t1 = _downsample(t1_image.get_fdata())
    grey = _downsample(_template("gm").get_fdata()) / 255.0
    white = _downsample(_template("wm").get_fdata()) / 255.0

    affine = t1_image.affine.copy()
    affine[:3, :3] *= 2.0
    affine[:3, 3] += t1_image.affine[:3, :3] @ np.full(3, 0.5)  # centre of the first 2 x 2 x 2 block

    head = np.argwhere(t1 > 0)
    low, high = head.min(axis=0), head.max(axis=0) + 1
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    affine[:3, 3] += affine[:3, :3] @ low

    tissue = np.zeros(t1.shape, dtype=np.uint8)
    brain = grey + white >= 0.5
    tissue[brain & (grey >= white)] = 1
    tissue[brain & (grey < white)] = 2

    OUT.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.round(t1[box]).astype(np.uint8), affine)
    label = nib.Nifti1Image(tissue[box], affine)
    for img in (image, label):
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=4)  # MNI152 space
        img.set_sform(affine, code=4)
    nib.save(image, OUT / "mni152_2mm_t1.nii.gz")
    nib.save(label, OUT / "mni152_2mm_tissue.nii.gz")
    counts = np.bincount(tissue[box].ravel(), minlength=3)
    print(f"wrote {OUT}: shape {image.shape}, tissue voxels {counts.tolist()}")


if __name__ == "__main__":
    main()
