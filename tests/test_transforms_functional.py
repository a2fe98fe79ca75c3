"""The functional crop layer: lean MetaTensor construction equals MONAI's, and patches own their meta."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from monai.data import MetaTensor

from monai_patchqueue.transforms.functional import (
    contiguous_copy,
    crop_patches,
    new_metatensor,
    shifted_affine,
    shifted_affines,
)


def test_new_metatensor_matches_the_monai_constructor():
    data = torch.rand(1, 4, 5, 6)
    meta = {"affine": torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64)), "filename_or_obj": "x"}
    ours = new_metatensor(data, dict(meta), [{"class": "A"}])
    theirs = MetaTensor(data, meta=dict(meta), applied_operations=[{"class": "A"}])
    assert ours.meta.keys() == theirs.meta.keys()
    torch.testing.assert_close(ours.affine, theirs.affine)
    assert ours.applied_operations == theirs.applied_operations
    assert ours.is_batch == theirs.is_batch and ours.pending_operations == theirs.pending_operations
    assert ours.spatial_ndim == theirs.spatial_ndim
    assert ours.data_ptr() == data.data_ptr()  # no copy of the voxels


def test_shifted_affines_agree_with_the_single_version():
    affine = torch.tensor([[0.0, -2.0, 0.5, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.3, 3.0, 5.0], [0, 0, 0, 1]],
                          dtype=torch.float64)  # fmt: skip
    starts = np.array([[0, 0, 0], [1, 2, 3], [7, 0, 5]])
    batched = shifted_affines(affine, starts)
    for start, result in zip(starts, batched):
        torch.testing.assert_close(result, shifted_affine(affine, start.tolist()))


def test_patches_own_their_meta_arrays_and_trace():
    image = MetaTensor(torch.rand(1, 8, 8, 8))
    image.meta["pixdim"] = np.array([1.0, 1.0, 1.0, 1.0])
    image.applied_operations = [{"class": "Earlier", "extra_info": {"value": [1]}}]
    first, second = crop_patches(image, np.array([[0, 0, 0, 4, 4, 4], [4, 4, 4, 8, 8, 8]]), {"class": "Crop"})
    first.meta["pixdim"][1] = 9.0  # MONAI updates pixdim in place
    first.applied_operations[0]["extra_info"]["value"].append(2)
    assert image.meta["pixdim"][1] == 1.0 and second.meta["pixdim"][1] == 1.0
    assert image.applied_operations[0]["extra_info"]["value"] == [1]
    assert [op["class"] for op in second.applied_operations] == ["Earlier", "Crop"]
    assert second.applied_operations[-1]["extra_info"]["location"] == [4, 4, 4, 8, 8, 8]
    assert second.applied_operations[-1]["orig_size"] == (8, 8, 8)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    order_seed=st.integers(0, 10_000),
    sliced=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.uint8, torch.int16, torch.float64, torch.float16, torch.bfloat16]),
)
def test_contiguous_copy_equals_torch_copy_for_any_memory_order(shape, order_seed, sliced, dtype):
    """Fortran-ordered views take the transposing path; every other layout torch's own copy."""
    order = np.random.default_rng(order_seed).permutation(len(shape))
    storage_shape = [shape[axis] + (2 if sliced else 0) for axis in order]
    stored = torch.arange(int(np.prod(storage_shape))).reshape(storage_shape).to(dtype)
    view = stored.permute(*np.argsort(order).tolist())
    if sliced:
        view = view[tuple(slice(1, 1 + size) for size in shape)]
    copy = contiguous_copy(view)
    assert copy.is_contiguous() and copy.shape == view.shape and copy.dtype == dtype
    assert torch.equal(copy, view)
    assert copy.untyped_storage().data_ptr() != stored.untyped_storage().data_ptr()
    out = torch.full(view.shape, 7, dtype=dtype)
    assert contiguous_copy(view, out) is out and torch.equal(out, view)  # written where the caller asked


@pytest.mark.parametrize(
    "out, message",
    [
        (torch.empty(2, 3, 4), r"shape \(2, 3, 5\).*got a torch.float32 tensor of shape \(2, 3, 4\)"),
        (torch.empty(2, 3, 5, dtype=torch.float64), "got a torch.float64 tensor"),
        (torch.empty(5, 3, 2).permute(2, 1, 0), "got a non-contiguous torch.float32"),
    ],
)
def test_contiguous_copy_refuses_an_out_tensor_it_cannot_fill(out, message):
    with pytest.raises(ValueError, match=message):
        contiguous_copy(torch.zeros(2, 3, 5), out)


def test_contiguous_copy_of_a_fortran_patch_takes_the_transposing_path():
    fortran_volume = torch.arange(2 * 10 * 9 * 8, dtype=torch.float32).reshape(8, 9, 10, 2).permute(3, 2, 1, 0)
    view = fortran_volume[:1, 2:7, 1:5, 3:8]
    assert torch.equal(contiguous_copy(view), view.clone(memory_format=torch.contiguous_format))


@pytest.mark.parametrize(
    "dtype, words", [(torch.float16, torch.int16), (torch.float32, torch.int32), (torch.float64, torch.int64)]
)
def test_a_fortran_ordered_float_patch_keeps_every_bit(dtype, words):
    """Floats travel as integers of their width: NaN payloads, signed zeros and infinities come out unchanged."""
    bits = torch.randint(-(2**15), 2**15, (12, 11, 10), generator=torch.Generator().manual_seed(0)).to(words)
    floats = bits.view(dtype)  # sign-extended low halves: NaNs with payloads, subnormals, +0
    floats[3, 4, 2:6] = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan")], dtype=dtype)
    volume = floats.permute(2, 1, 0)  # Fortran order
    view = volume[1:9, 2:10, 3:11]
    copy = contiguous_copy(view)
    assert copy.dtype == dtype and copy.is_contiguous()
    assert torch.equal(copy.view(words), view.contiguous().view(words))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_a_channels_last_file_patch_is_copied_channel_by_channel_through_the_transposing_path(monkeypatch, dtype):
    """A 4-D NIfTI volume (x, y, z, c) in file order, its channel axis moved first, as LoadMappedNifti gives it."""
    from monai_patchqueue.transforms import functional

    blocks = []
    transposing = functional._copy_fortran_block
    monkeypatch.setattr(functional, "_copy_fortran_block", lambda *args: blocks.append(1) or transposing(*args))
    file_order = (torch.arange(3 * 9 * 10 * 11) % 253).to(dtype).reshape(3, 11, 10, 9).permute(3, 2, 1, 0)
    view = file_order.movedim(3, 0)[:, 1:8, 2:9, 0:10]  # (3, 7, 7, 10), channel stride the largest
    out = torch.full(view.shape, 7, dtype=dtype)
    assert contiguous_copy(view, out) is out and torch.equal(out, view.clone(memory_format=torch.contiguous_format))
    assert len(blocks) == 3  # one per channel
    voxels_of_channels = (torch.arange(9 * 10 * 11 * 3) % 253).to(dtype).reshape(11, 10, 9, 3).permute(2, 1, 0, 3)
    interleaved = voxels_of_channels.movedim(3, 0)  # channel stride 1, spatial axes in file order: torch's copy
    assert interleaved.stride()[0] == 1 and torch.equal(contiguous_copy(interleaved), interleaved.contiguous())
    assert len(blocks) == 3


def test_a_fortran_ordered_byte_patch_of_unequal_sides_copies_exactly():
    labels = (torch.arange(40 * 30 * 24) % 251).to(torch.uint8).reshape(24, 30, 40).permute(2, 1, 0)[None]
    view = labels[:, 3:35, 2:20, 0:16]
    assert torch.equal(contiguous_copy(view), view.clone(memory_format=torch.contiguous_format))
