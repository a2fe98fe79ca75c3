"""LoadMappedNifti(d): the same values and metadata as MONAI's LoadImage, voxels left in a copy-on-write map."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged

from monai_patchqueue import LabelSamplerd, LoadMappedNifti, LoadMappedNiftid, PatchQueueDataset
from monai_patchqueue.transforms.loading import _with_voxels_from_itk

GENERATOR = np.random.default_rng(0)
AFFINE = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
VOLUMES = {
    "float32": (GENERATOR.random((7, 8, 9), dtype=np.float32), None),
    "uint8": (GENERATOR.integers(0, 3, (7, 8, 9)).astype(np.uint8), None),
    "channels": (GENERATOR.random((7, 8, 9, 2), dtype=np.float32), None),
    "scaled_int16": (GENERATOR.integers(0, 100, (7, 8, 9)).astype(np.int16), (2.0, 1.0)),
    "big_endian": (GENERATOR.random((7, 8, 9)).astype(">f4"), None),
    "uint16": (GENERATOR.integers(0, 1000, (7, 8, 9)).astype(np.uint16), None),  # MONAI gives int32
    "int8": (GENERATOR.integers(-3, 3, (7, 8, 9)).astype(np.int8), None),  # a type ITK's build lacks
}


def save(folder: Path, name: str, suffix: str) -> Path:
    array, scaling = VOLUMES[name]
    image = nib.Nifti1Image(array, AFFINE)
    if scaling is not None:
        image.header.set_slope_inter(*scaling)
    path = folder / f"{name}{suffix}"
    nib.save(image, path)
    return path


def same_meta_value(a: object, b: object) -> bool:
    if isinstance(a, (np.ndarray, torch.Tensor, np.generic, float)):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    return a == b


@pytest.mark.parametrize("ensure_channel_first", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, None, "uint8"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("name", list(VOLUMES))
def test_values_and_metadata_equal_monai_load_image(tmp_path, name, suffix, dtype, ensure_channel_first):
    path = save(tmp_path, name, suffix)
    theirs = LoadImage(reader="NibabelReader", dtype=dtype, image_only=True, ensure_channel_first=ensure_channel_first)
    expected = theirs(path)
    loaded = LoadMappedNifti(dtype=dtype, ensure_channel_first=ensure_channel_first)(path)
    assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
    assert torch.equal(loaded.as_tensor(), expected.as_tensor())
    torch.testing.assert_close(loaded.affine, expected.affine, rtol=0, atol=0)
    assert loaded.meta.keys() == expected.meta.keys()
    different = [key for key in expected.meta if not same_meta_value(loaded.meta[key], expected.meta[key])]
    assert not different, different


def test_a_plain_nii_stays_mapped_in_file_order_and_writes_never_reach_the_file(tmp_path):
    path = save(tmp_path, "float32", ".nii")
    before = path.read_bytes()
    volume = LoadMappedNifti(ensure_channel_first=True)(path)
    assert volume.shape == (1, 7, 8, 9)
    assert volume.stride()[1:] == (1, 7, 56)  # the file's Fortran order: no C-ordered copy was made
    volume[0, 1, 2, 3] = -5.0  # copy-on-write: the tensor changes, the file does not
    assert float(volume[0, 1, 2, 3]) == -5.0
    assert path.read_bytes() == before
    assert torch.equal(LoadMappedNifti()(path)[1, 2, 3], torch.tensor(VOLUMES["float32"][0][1, 2, 3]))


def test_a_requested_dtype_other_than_the_stored_one_is_a_converted_copy(tmp_path):
    path = save(tmp_path, "uint8", ".nii")
    as_float = LoadMappedNifti(dtype=np.float32)(path)
    stored = LoadMappedNifti(dtype=None)(path)
    assert as_float.dtype == torch.float32 and stored.dtype == torch.uint8
    assert torch.equal(as_float.as_tensor(), stored.as_tensor().float())


def test_missing_files_and_other_formats_raise_naming_the_file_and_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.nii"):
        LoadMappedNifti()(tmp_path / "absent.nii")
    with pytest.raises(ValueError, match=r"NIfTI.*scan\.mha"):
        LoadMappedNifti()(tmp_path / "scan.mha")
    with pytest.raises(FileNotFoundError, match=r"key 'label'.*absent\.nii"):
        LoadMappedNiftid("label")({"label": tmp_path / "absent.nii"})
    with pytest.raises(TypeError, match="ensure_channel_first"):
        LoadMappedNifti(ensure_channel_first="yes")
    with pytest.raises(TypeError, match="dtype='voxels'"):
        LoadMappedNifti(dtype="voxels")


def test_the_dictionary_version_loads_each_key_and_keeps_other_entries(tmp_path):
    image, label = save(tmp_path, "float32", ".nii"), save(tmp_path, "uint8", ".nii")
    subject = LoadMappedNiftid(["image", "label"], dtype=None, ensure_channel_first=True)(
        {"image": image, "label": str(label), "id": 3}
    )
    assert subject["id"] == 3
    assert subject["image"].dtype == torch.float32 and subject["label"].dtype == torch.uint8
    assert subject["label"].meta["filename_or_obj"] == str(label)
    assert LoadMappedNiftid(["image", "other"], allow_missing_keys=True)({"image": image})["image"].shape == (7, 8, 9)


@pytest.fixture(scope="module")
def nii_subjects(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("mapped")
    generator = np.random.default_rng(1)
    subjects = []
    for index in range(3):
        image = generator.random((20, 18, 16), dtype=np.float32)
        label = (image * 3).astype(np.uint8)
        paths = {key: folder / f"{key}_{index}.nii" for key in ("image", "label")}
        nib.save(nib.Nifti1Image(image, AFFINE), paths["image"])
        nib.save(nib.Nifti1Image(label, AFFINE), paths["label"])
        subjects.append({key: str(path) for key, path in paths.items()})
    return subjects


def mapped_loader() -> Compose:
    return Compose([
        LoadMappedNiftid("image", ensure_channel_first=True),
        LoadMappedNiftid("label", dtype="uint8", ensure_channel_first=True),
    ])  # fmt: skip


def monai_loader() -> Compose:
    return Compose([
        LoadImaged("image", image_only=True),
        LoadImaged("label", image_only=True, dtype=np.uint8),
        EnsureChannelFirstd(["image", "label"]),
    ])  # fmt: skip


def test_patches_of_a_mapped_volume_equal_patches_of_monai_loaded_volume(nii_subjects):
    sampler = LabelSamplerd(["image", "label"], (8, 6, 5), "label", 12, label_probabilities={0: 1, 1: 1, 2: 1})
    sampler.set_random_state(seed=3)
    expected = sampler(monai_loader()(nii_subjects[0]))
    sampler.set_random_state(seed=3)
    patches = sampler(mapped_loader()(nii_subjects[0]))
    for ours, theirs in zip(patches, expected, strict=True):
        assert torch.equal(ours["location"], theirs["location"])
        for key in ("image", "label"):
            assert ours[key].is_contiguous() and ours[key].shape == theirs[key].shape
            assert torch.equal(ours[key].as_tensor(), theirs[key].as_tensor())
            torch.testing.assert_close(ours[key].affine, theirs[key].affine)


@pytest.mark.timeout(120)
def test_the_queue_streams_the_same_patches_from_mapped_files_in_two_workers(nii_subjects):
    def stream(transform, num_workers: int) -> list[tuple]:
        sampler = LabelSamplerd(["image", "label"], 6, "label", 4, label_probabilities={0: 1, 1: 1, 2: 1})
        with PatchQueueDataset(nii_subjects, sampler, 8, 4, transform=transform, num_workers=num_workers, seed=5) as q:
            return [(patch["location"].tolist(), patch["image"].as_tensor(), patch["label"].as_tensor()) for patch in q]

    expected = stream(monai_loader(), 0)
    received = stream(mapped_loader(), 2)
    assert len(received) == len(expected) == 12
    for (location, image, label), (location_ref, image_ref, label_ref) in zip(received, expected):
        assert location == location_ref and torch.equal(image, image_ref) and torch.equal(label, label_ref)


@pytest.mark.parametrize(
    ("name", "from_itk"),
    [
        ("float32", True),
        ("uint8", True),
        ("uint16", True),
        ("big_endian", True),
        ("scaled_int16", False),
        ("channels", True),
        ("int8", False),
    ],
)
def test_compressed_files_take_their_voxels_from_itk_unless_scaled_or_of_a_type_itk_lacks(tmp_path, name, from_itk):
    path = save(tmp_path, name, ".nii.gz")
    image = nib.load(path)
    result = _with_voxels_from_itk(image, path)
    assert (result is not image) == from_itk
    if from_itk:
        voxels = np.asanyarray(result.dataobj)
        assert type(voxels.base).__name__ == "NDArrayITKBase" and voxels.flags.f_contiguous
        assert np.array_equal(voxels, np.asanyarray(image.dataobj)) and result.header == image.header


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti2_file_loads_as_monai_loads_it(tmp_path, suffix):
    path = tmp_path / f"nifti2{suffix}"
    nib.save(nib.Nifti2Image(VOLUMES["float32"][0], AFFINE), path)
    expected = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)(path)
    loaded = LoadMappedNifti(ensure_channel_first=True)(path)
    assert torch.equal(loaded.as_tensor(), expected.as_tensor()) and torch.equal(loaded.affine, expected.affine)
    assert [key for key in expected.meta if not same_meta_value(loaded.meta[key], expected.meta[key])] == []


def test_a_bundle_config_builds_the_loader_with_a_dtype_name(tmp_path):
    path = save(tmp_path, "uint8", ".nii")
    config = {
        "load": {
            "_target_": "monai_patchqueue.LoadMappedNiftid",
            "keys": ["label"],
            "dtype": "uint8",
            "ensure_channel_first": True,
        }
    }
    parser = ConfigParser(config)
    subject = parser.get_parsed_content("load")({"label": str(path)})
    assert subject["label"].dtype == torch.uint8 and subject["label"].shape == (1, 7, 8, 9)


def test_an_analyze_style_pair_loads_as_monai_loads_it(tmp_path):
    array = VOLUMES["float32"][0]
    nib.save(nib.Nifti1Pair(array, AFFINE), tmp_path / "pair.img")
    expected = LoadImage(reader="NibabelReader", image_only=True)(tmp_path / "pair.img")
    loaded = LoadMappedNifti()(tmp_path / "pair.img")
    assert torch.equal(loaded.as_tensor(), expected.as_tensor()) and loaded.meta.keys() == expected.meta.keys()
    assert loaded.stride() == (1, 7, 56)  # mapped in file order


def test_a_list_of_files_is_refused_naming_the_argument_and_the_key(tmp_path):
    with pytest.raises(TypeError, match=r"filename.*list"):
        LoadMappedNifti()([tmp_path / "a.nii", tmp_path / "b.nii"])
    with pytest.raises(TypeError, match=r"key 'image'.*filename.*list"):
        LoadMappedNiftid("image")({"image": [tmp_path / "a.nii"]})


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_without_the_header_only_monai_entries_remain_with_load_images_values(tmp_path, suffix):
    from monai_patchqueue.transforms.loading import STRUCTURAL_KEYS

    path = save(tmp_path, "channels", suffix)
    expected = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)(path)
    lean = LoadMappedNifti(ensure_channel_first=True, keep_header=False)(path)
    assert torch.equal(lean.as_tensor(), expected.as_tensor())
    assert set(lean.meta) == STRUCTURAL_KEYS & set(expected.meta)
    assert {"affine", "original_affine", "spatial_shape", "pixdim", "filename_or_obj"} <= set(lean.meta)
    assert not {"sizeof_hdr", "dim", "srow_x", "qform_code"} & set(lean.meta)
    assert all(same_meta_value(lean.meta[key], expected.meta[key]) for key in lean.meta)
    # MONAI's spatial transforms need no more: the same result as from LoadImage's full header
    from monai.transforms import Orientation, Spacing

    for transform in (Orientation("LPS", labels=None), Spacing((1.0, 2.0, 2.5))):
        ours, theirs = transform(lean), transform(expected)
        assert torch.equal(ours.as_tensor(), theirs.as_tensor())
        torch.testing.assert_close(ours.affine, theirs.affine)
    # and MONAI's saver writes the file back with its affine
    from monai.transforms import SaveImage

    SaveImage(output_dir=tmp_path / "saved", output_postfix="back", separate_folder=False, print_log=False)(lean)
    saved = nib.load(tmp_path / "saved" / "channels_back.nii.gz")
    np.testing.assert_array_equal(saved.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), VOLUMES["channels"][0])


def test_the_header_option_reaches_the_dictionary_version_and_is_checked(tmp_path):
    image = save(tmp_path, "float32", ".nii")
    subject = LoadMappedNiftid("image", keep_header=False)({"image": image})
    assert "dim" not in subject["image"].meta and "affine" in subject["image"].meta
    assert "dim" in LoadMappedNiftid("image")({"image": image})["image"].meta  # kept by default, as LoadImaged
    with pytest.raises(TypeError, match="keep_header"):
        LoadMappedNifti(keep_header="no")


def test_patches_and_batches_of_headerless_volumes_carry_only_monai_entries(nii_subjects):
    from torch.utils.data import DataLoader

    load = Compose([LoadMappedNiftid(["image", "label"], ensure_channel_first=True, keep_header=False)])
    sampler = LabelSamplerd(["image", "label"], 6, "label", 4, label_probabilities={0: 1, 1: 1, 2: 1})
    with PatchQueueDataset(nii_subjects, sampler, 8, 4, transform=load, seed=0) as queue:
        batch = next(iter(DataLoader(queue, batch_size=4)))
    assert "dim" not in batch["image"].meta and batch["image"].affine.shape == (4, 4, 4)
    assert set(batch["image"].meta["filename_or_obj"]) <= {subject["image"] for subject in nii_subjects}
    assert set(batch["label"].meta) == set(batch["image"].meta)
