"""Cropping patches out of a volume and putting them back, with the affine, location and trace kept right.

These are the functional layer under the array samplers: no randomness, no keys.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.utils import MetaKeys, SpaceKeys, TraceKeys

from .patch_memory import new_patch_tensors, patch_metadata_is_shared

__all__ = [
    "LOCATION",
    "contiguous_copy",
    "crop_patches",
    "location_slices",
    "new_metatensor",
    "plain_tensor",
    "restore_patch",
    "shifted_affine",
    "shifted_affines",
    "spatial_shape_of",
]

LOCATION = "location"
"""Key of a patch's location (starts then exclusive ends, int64) in its dict and in its MetaTensor's meta."""


def spatial_shape_of(img: torch.Tensor | np.ndarray, where: str) -> tuple[int, ...]:
    """Return the spatial shape of a channel-first image with 2 or 3 spatial dims, or raise naming ``where``."""
    if not hasattr(img, "shape"):
        raise TypeError(f"{where} should be a tensor or array, but got {type(img).__name__}")
    if len(img.shape) not in (3, 4):
        raise ValueError(
            f"{where} should be channel-first with 2 or 3 spatial dims, (C, H, W[, D]), but has shape "
            f"{tuple(int(s) for s in img.shape)}"
        )
    return tuple(int(s) for s in img.shape[1:])


def plain_tensor(img: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Return ``img`` as a plain tensor sharing its memory: a MetaTensor's data without its metadata.

    Arithmetic on a MetaTensor goes through MONAI's metadata propagation on every operation (tens of
    microseconds each); samplers compute on the plain data.

    Example:
        >>> from monai.data import MetaTensor
        >>> type(plain_tensor(MetaTensor(torch.zeros(2)))).__name__, type(plain_tensor(np.zeros(2))).__name__
        ('Tensor', 'Tensor')
    """
    return img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)


def shifted_affine(affine: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
    """Return the affine of a crop starting at voxel ``start``: its voxel 0 maps to the world point of ``start``.

    Spacing and direction are unchanged; only the translation column moves.

    Example:
        >>> shifted_affine(torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])), (1, 2, 3))[:3, 3]
        tensor([2., 4., 6.], dtype=torch.float64)
    """
    return shifted_affines(affine, np.asarray([start], dtype=np.int64).reshape(1, -1))[0]


def location_slices(location: Sequence[int]) -> tuple[slice, ...]:
    """Return the slices ``(:, s0:e0, s1:e1, ...)`` that crop a channel-first image at ``location``."""
    half = len(location) // 2
    return (slice(None), *tuple(slice(int(s), int(e)) for s, e in zip(location[:half], location[half:])))


def shifted_affines(affine: torch.Tensor, starts: np.ndarray) -> torch.Tensor:
    """Return ``(K, r + 1, r + 1)`` affines, one per row of ``starts``, as :func:`shifted_affine` in one op."""
    affine = torch.as_tensor(affine, dtype=torch.float64)
    rank = affine.shape[-1] - 1
    used = min(starts.shape[1], rank)
    shifts = torch.as_tensor(starts[:, :used], dtype=torch.float64, device=affine.device) @ affine[:rank, :used].T
    out = affine.expand(len(starts), -1, -1).clone()
    out[:, :rank, rank] += shifts
    return out


def _meta_copy(meta: dict) -> dict:
    """Return a copy of ``meta`` whose arrays, tensors and containers are copied, other values shared.

    MONAI's MetaTensor constructor deep-copies the whole meta dict, which dominates the cost of a small crop;
    this copies only what can be changed in place (e.g. ``pixdim`` is updated in place by later transforms).
    """
    out = {}
    for key, value in meta.items():
        if isinstance(value, np.ndarray):
            value = value.copy()
        elif isinstance(value, torch.Tensor):
            value = value.clone()
        elif isinstance(value, (dict, list, set)):
            value = copy.deepcopy(value)
        out[key] = value
    return out


def new_metatensor(data: torch.Tensor, meta: dict, applied_operations: list) -> MetaTensor:
    """Wrap ``data`` (no copy) in a MetaTensor owning ``meta`` and ``applied_operations`` as given.

    Equivalent to ``MetaTensor(data, meta=meta, applied_operations=applied_operations)`` without its deep copy
    of ``meta``: the caller passes a dict the patch can own.
    """
    out = data.as_subclass(MetaTensor)
    with torch._C.DisableTorchFunctionSubclass():  # the setters read `ndim`: 3x faster without MONAI's dispatch
        out.meta = meta
        out.affine = meta[MetaKeys.AFFINE]  # the setter also syncs the spatial rank
        out.applied_operations = applied_operations
    out.meta.setdefault(MetaKeys.SPACE, SpaceKeys.RAS)
    return out


def contiguous_copy(view: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return a C-contiguous copy of ``view`` (written into ``out`` when given); fast also when ``view`` is a
    Fortran-ordered 3-D patch.

    A NIfTI volume kept in its file's (Fortran) order, e.g. by :class:`~monai_patchqueue.LoadMappedNifti`,
    gives patches ``(x, y, z)`` whose first axis varies fastest in memory. torch copies such a view into C order
    one element at a time across the whole patch (about 1 ms per MB). Here the copy takes three passes that each
    move contiguous runs or small in-cache tiles: gather ``(y, z, x)`` (runs along x) into ``out``'s memory,
    transpose each y-slice to ``(y, x, z)`` (64 x 64 tiles for a 64^3 patch) in a scratch tensor, and swap the
    first two axes back into ``out`` (runs along z): about 0.3 ms per MB of float32 and 0.6 ms per MB of uint8
    for patches up to 96^3 with the volume in cache (about 0.55 ms per MB of float32 when the file's pages are
    cold in memory, as in the queue's workers, bound by this machine's memory bandwidth), where a blocked 2-D
    transpose of the whole patch took as long for float32 (7% less at 128^3) and twice as long for bytes.
    Gathering into ``out`` rather than a second scratch tensor saved 7-10% (0.79 -> 0.71 ms for a float32
    64^3 patch, 0.44 -> 0.41 ms for uint8, cut from four 192 x 192 x 160 volumes in turn, medians of 40 rounds).
    Floating-point patches are moved as integers of the same width, bit for bit (NaN payloads included),
    which torch copies faster. A patch with more channels (from a 4-D NIfTI file, channels last, whose channel
    axis was moved first) is copied one channel at a time, each as above, where torch's own copy of the whole
    patch goes element by element: ``UniformSampler`` cut float32 ``(4, 64, 64, 64)`` patches from a
    192 x 192 x 160 x 4 ``.nii`` loaded by :class:`~monai_patchqueue.LoadMappedNifti` in 1.6-1.7 instead of
    3.6 ms each (the three passes over all channels at once were slower than one channel at a time, their
    scratch tensor no longer in cache). Tensors on other devices than the CPU, and any other layout, get
    torch's own copy.

    Args:
        view: any tensor.
        out: a C-contiguous tensor of ``view``'s shape and dtype to write into; None for a new one.

    Example:
        >>> fortran = torch.arange(24.0).reshape(4, 3, 2).permute(2, 1, 0)  # shape (2, 3, 4), Fortran order
        >>> copy = contiguous_copy(fortran)
        >>> copy.is_contiguous(), torch.equal(copy, fortran)
        (True, True)
        >>> channels_last = torch.arange(48.0).reshape(4, 3, 2, 2).permute(2, 1, 0, 3)  # (x, y, z, c) file order
        >>> torch.equal(contiguous_copy(channels_last.movedim(3, 0)), channels_last.movedim(3, 0))
        True
    """
    if out is None:
        out = torch.empty(view.shape, dtype=view.dtype, device=view.device)
    elif out.shape != view.shape or out.dtype != view.dtype or not out.is_contiguous():
        raise ValueError(
            f"`out` should be a contiguous {view.dtype} tensor of shape {tuple(view.shape)}, but got a "
            f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} tensor of shape {tuple(out.shape)}"
        )
    core = view.squeeze()  # the axes longer than 1, as a view
    if view.device.type != "cpu" or not _fortran_blocks(core.stride()):  # torch's own copy
        return out.copy_(view)
    core, words = _as_words(core), _as_words(out)
    if core.dim() == 3:
        _copy_fortran_block(core, words)
        return out
    words = words.view(core.shape)
    for channel in itertools.product(*map(range, core.shape[:-3])):
        _copy_fortran_block(core[channel], words[channel])
    return out


def _fortran_blocks(strides: tuple[int, ...]) -> bool:
    """Whether a tensor of ``strides`` is Fortran-ordered 3-D blocks: its last three axes' strides ascend, and
    any axes before them (channels) step over whole blocks."""
    if len(strides) < 3:
        return False
    x, y, z = strides[-3:]
    return x <= y <= z and all(stride >= z for stride in strides[:-3])


def _copy_fortran_block(block: torch.Tensor, out: torch.Tensor) -> None:
    """Copy a Fortran-ordered 3-D ``block`` into the C-contiguous ``out`` (of as many elements) in the three
    passes of :func:`contiguous_copy`."""
    x, y, z = block.shape
    runs_along_x = out.view(y, z, x)  # out's memory holds the first pass: one scratch tensor instead of two
    runs_along_x.copy_(block.permute(1, 2, 0))
    runs_along_z = runs_along_x.transpose(1, 2).contiguous()  # (y, x, z)
    out.view(x, y, z).copy_(runs_along_z.transpose(0, 1))


_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_words(tensor: torch.Tensor) -> torch.Tensor:
    """Return a floating-point ``tensor`` viewed as integers of its width, any other tensor as it is.

    A copy moves bits either way, but torch's strided copy of float32 runs at about 0.6x the speed of the same
    copy of int32 (0.16 against 0.09 ms for the slice transposition of a 64^3 patch, measured here).

    Example:
        >>> _as_words(torch.tensor([1.0])).dtype, _as_words(torch.tensor([1], dtype=torch.uint8)).dtype
        (torch.int32, torch.uint8)
    """
    words = _WORDS.get(tensor.element_size()) if tensor.dtype.is_floating_point else None
    return tensor if words is None else tensor.view(words)


def crop_patches(
    img: torch.Tensor | np.ndarray, locations: np.ndarray, trace: dict | None = None
) -> list[torch.Tensor]:
    """Return one contiguous copy of ``img`` per location.

    The copies are tensors of their own, or slots of memory lent through :mod:`.patch_memory` (the patch
    queue's workers write patches straight into the shared memory that carries them).

    With metadata tracking on (MONAI's default), each patch is a MetaTensor that carries a copy of ``img``'s
    meta with the affine shifted to the patch (:func:`shifted_affine`), ``meta["location"]`` (int64, starts
    then ends), and ``img``'s applied operations followed by ``trace`` (when given) completed with the original
    size and the location, so that the patch can be put back by :func:`restore_patch`.
    Each patch's metadata arrays are its own copies, or one copy shared by this call's patches inside
    :func:`.patch_memory.patch_metadata_shared`.

    Args:
        img: ``(C, *spatial)`` MetaTensor, tensor or array.
        locations: ``(K, 2n)`` int locations inside the spatial shape.
        trace: the cropping transform's ``get_transform_info()``, or None not to record one.

    Example:
        >>> from monai.data import MetaTensor
        >>> patches = crop_patches(MetaTensor(torch.arange(16.0).reshape(1, 4, 4)), np.array([[1, 1, 3, 3]]))
        >>> patches[0].as_tensor()
        tensor([[[ 5.,  6.],
                 [ 9., 10.]]])
        >>> patches[0].meta["location"]
        tensor([1, 1, 3, 3])
    """
    data = plain_tensor(img)
    crops = [contiguous_copy(view, out) for view, out in zip(*_views_and_targets(data, locations))]
    if not get_track_meta():
        return crops
    if isinstance(img, MetaTensor):
        meta, affine, operations = img.meta, img.affine, img.applied_operations
    else:
        meta, affine, operations = {}, MetaTensor.get_default_affine(), []
    half = locations.shape[1] // 2
    affines = shifted_affines(affine, locations[:, :half])
    original_size = tuple(int(s) for s in data.shape[1:])
    shared_meta = _meta_copy(meta) if patch_metadata_is_shared() else None
    patches = []
    for crop, location, patch_affine in zip(crops, locations, affines):
        patch_meta = _meta_copy(meta) if shared_meta is None else dict(shared_meta)
        patch_meta[MetaKeys.AFFINE] = patch_affine.clone()  # its own storage, not a view of the batch
        patch_meta[LOCATION] = torch.as_tensor(location, dtype=torch.int64)
        patch_operations = copy.deepcopy(operations) if operations else []
        if trace is not None:
            extra = {LOCATION: [int(v) for v in location]}
            patch_operations.append({**trace, TraceKeys.ORIG_SIZE: original_size, TraceKeys.EXTRA_INFO: extra})
        patches.append(new_metatensor(crop, patch_meta, patch_operations))
    return patches


def _views_and_targets(data: torch.Tensor, locations: np.ndarray) -> tuple[list, list]:
    """Return the crop views of ``data`` at ``locations`` and the tensors to copy them into, the latter as
    consecutive slots of one stack from :func:`.patch_memory.new_patch_tensors` when the crops share a shape."""
    views = [data[location_slices(location)] for location in locations]
    if len({view.shape for view in views}) == 1:
        return views, new_patch_tensors(len(views), views[0].shape, data.dtype, data.device)
    return views, [None] * len(views)


def restore_patch(patch: torch.Tensor, transform: dict) -> MetaTensor:
    """Return ``patch`` put back at its location in a zero volume of the original spatial shape.

    Args:
        patch: ``(C, *patch_size)`` MetaTensor whose cropping entry was popped into ``transform``.
        transform: the popped trace entry written by :func:`crop_patches`.

    Raises:
        ValueError: the patch's spatial shape is not the one recorded at cropping.
    """
    original_shape = tuple(transform[TraceKeys.ORIG_SIZE])
    location = transform[TraceKeys.EXTRA_INFO][LOCATION]
    half = len(location) // 2
    expected = tuple(e - s for s, e in zip(location[:half], location[half:]))
    if tuple(patch.shape[1:]) != expected:
        raise ValueError(
            f"cannot put back a patch of spatial shape {tuple(patch.shape[1:])} at location {location}: "
            f"it was cropped with spatial shape {expected}"
        )
    data = plain_tensor(patch)
    volume = torch.zeros((data.shape[0], *original_shape), dtype=data.dtype, device=data.device)
    volume[location_slices(location)] = data
    if not isinstance(patch, MetaTensor):
        return MetaTensor(volume)
    meta = _meta_copy(patch.meta)
    meta.pop(LOCATION, None)
    meta[MetaKeys.AFFINE] = shifted_affine(patch.affine, [-s for s in location[:half]])
    return new_metatensor(volume, meta, copy.deepcopy(patch.applied_operations))
