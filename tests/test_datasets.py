"""The embedded example brain: files, geometry, classes and the notice."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from monai_patchqueue import example_brain


def test_example_brain_is_a_datalist_entry_of_existing_files():
    entry = example_brain()
    assert set(entry) == {"image", "label"}
    for path in entry.values():
        assert Path(path).is_file() and path.endswith(".nii.gz")
    total = sum(Path(path).stat().st_size for path in entry.values())
    assert total < 1_000_000  # a few hundred KB shipped in the wheel


def test_example_brain_geometry_and_classes():
    entry = example_brain()
    image, label = nib.load(entry["image"]), nib.load(entry["label"])
    assert image.shape == label.shape == (73, 91, 78)
    np.testing.assert_allclose(image.affine, label.affine)
    np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), 2.0)  # 2 mm voxels
    classes, counts = np.unique(np.asarray(label.dataobj), return_counts=True)
    assert classes.tolist() == [0, 1, 2]
    assert counts[1] > counts[2] > 0.05 * counts.sum()  # grey matter outnumbers white matter
    intensity = np.asarray(image.dataobj, dtype=np.float32)
    tissue = np.asarray(label.dataobj)
    # T1 contrast: white matter brighter than grey matter, which is brighter than background.
    assert intensity[tissue == 2].mean() > intensity[tissue == 1].mean() > intensity[tissue == 0].mean()


def test_notice_with_the_mni_permission_ships_beside_the_data():
    notice = Path(example_brain()["image"]).parent / "NOTICE"
    text = notice.read_text()
    assert "McConnell Brain Imaging Centre" in text and "Permission to use, copy, modify" in text
