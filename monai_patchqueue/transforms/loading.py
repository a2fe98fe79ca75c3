"""Loading NIfTI volumes for patch sampling without MONAI's whole-volume C-ordered copy.

MONAI's ``LoadImage`` reads every voxel and makes a C-ordered copy of each (Fortran-ordered) NIfTI volume
before any transform runs; for patch-based training that copy is a large part of the loading time, although a
patch sampler then reads a few percent of the voxels. :class:`LoadMappedNifti` returns the same values and the
same metadata as ``LoadImage(reader="NibabelReader")``, with the voxels in the file's order:

- an uncompressed ``.nii`` stays in a copy-on-write memory map of the file: only the pages a transform touches
  are read, and writing to the tensor never changes the file (about 1 ms instead of about 60 ms for 23 MB);
- a ``.nii.gz`` is decompressed by ITK (about twice as fast as nibabel) into memory, without the copy (about
  45 ms instead of about 75 ms with ``LoadImage(reader="ITKReader")``);
- scaled data (``scl_slope``/``scl_inter``), a requested ``dtype`` other than the stored one, byte-swapped
  ``.nii`` files, compressed NIfTI-2 files, voxel types ITK's build lacks (int8) and images ITK reads
  differently (vector-valued, or of more than 4 dimensions) are read by nibabel and converted as ``LoadImage``
  would, with the same values (unsigned 16-64-bit integers become int32 or int64, as MONAI converts them).

Patches cut from such a volume are copied into C order by the samplers (:func:`.functional.contiguous_copy`).
Transforms that compute on every voxel (intensity scaling, resampling) read the whole volume anyway and gain
little; the loader pays off when the per-subject transform before sampling is cheap or crop-only. Use the
``ensure_channel_first`` argument rather than a following ``EnsureChannelFirstd``, which makes a contiguous copy.

With ``keep_header=False`` the metadata keeps MONAI's own entries (:data:`STRUCTURAL_KEYS`: affines, spatial
shape, space, pixel dimensions, channel axis, file name) and drops the ~35 raw NIfTI header fields that
``LoadImage`` copies into it (``sizeof_hdr``, ``dim``, ``srow_x``, ``qform_code``...), which no MONAI transform,
inverse or saver reads. Every patch and batch then carries 8 instead of 44 entries per image: in the queue
benchmark (``.nii``, uniform sampler) that was 5-15% more patches per second.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.data.utils import is_no_channel
from monai.transforms import MapTransform, Transform
from monai.transforms.io.array import switch_endianness
from monai.utils import ImageMetaKey, MetaKeys, get_equivalent_dtype
from monai.utils.type_conversion import UNSUPPORTED_TYPES

from .._checks import check_bool

__all__ = ["STRUCTURAL_KEYS", "LoadMappedNifti", "LoadMappedNiftid"]

_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".img.gz")

STRUCTURAL_KEYS = frozenset({*(str(key) for key in MetaKeys), str(ImageMetaKey.FILENAME_OR_OBJ)})
"""The metadata entries that ``keep_header=False`` keeps: MONAI's ``MetaKeys`` (``affine``, ``original_affine``,
``spatial_shape``, ``space``, ``pixdim``, ``original_pixdim``, ``original_channel_dim``, ``saved_to``) and the
file name."""


class LoadMappedNifti(Transform):
    """Load a NIfTI file as a MetaTensor whose voxels stay memory-mapped when the file allows it.

    Values and metadata equal MONAI's ``LoadImage(reader="NibabelReader", dtype=dtype,
    ensure_channel_first=ensure_channel_first, image_only=True)``; the tensor has the file's (Fortran) strides
    instead of a C-contiguous copy. An uncompressed ``.nii`` stays memory-mapped, a ``.nii.gz`` is decompressed
    by ITK; see the module docstring for the cases read as ``LoadImage`` reads them.

    Args:
        dtype: the output dtype (a numpy or torch dtype, or its name such as ``"uint8"``), as ``LoadImage``'s
            ``dtype`` (default float32); None keeps the stored dtype.
        ensure_channel_first: add a leading channel axis to a volume without one, as ``EnsureChannelFirst``.
        keep_header: keep the raw NIfTI header fields in the metadata, as ``LoadImage`` does; False keeps only
            :data:`STRUCTURAL_KEYS` (see the module docstring).

    Raises:
        TypeError: ``dtype`` is not a dtype, or ``filename`` is not one path (multi-file stacking as in
            ``LoadImage`` is not supported).
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file name does not end in a NIfTI suffix.

    Example:
        >>> import tempfile, nibabel as nib
        >>> path = Path(tempfile.mkdtemp()) / "volume.nii"
        >>> nib.save(nib.Nifti1Image(np.arange(512, dtype=np.float32).reshape(8, 8, 8), np.eye(4)), path)
        >>> volume = LoadMappedNifti(ensure_channel_first=True)(path)
        >>> volume.shape, volume.dtype, float(volume[0, 1, 2, 3])
        (torch.Size([1, 8, 8, 8]), torch.float32, 83.0)
        >>> lean = LoadMappedNifti(keep_header=False)(path)  # without the raw header fields
        >>> len(volume.meta), len(lean.meta), "dim" in lean.meta, "affine" in lean.meta
        (44, 8, False, True)
    """

    def __init__(
        self, *, dtype: object = np.float32, ensure_channel_first: bool = False, keep_header: bool = True
    ) -> None:
        self.dtype = None if dtype is None else _numpy_dtype(dtype)
        self.ensure_channel_first = check_bool(ensure_channel_first, "ensure_channel_first")
        self.keep_header = check_bool(keep_header, "keep_header")

    def __call__(self, filename: str | os.PathLike) -> MetaTensor:
        """Return the volume in ``filename`` as a MetaTensor, channel axis first if ``ensure_channel_first``."""
        if not isinstance(filename, (str, os.PathLike)):
            kind = type(filename).__name__
            raise TypeError(f"`filename` should be the path of one NIfTI file, but got a {kind}: {filename!r:.200}")
        path = Path(filename)
        if not path.name.endswith(_SUFFIXES):
            raise ValueError(f"LoadMappedNifti reads NIfTI files ({', '.join(_SUFFIXES)}), but got {str(path)!r}")
        if not path.exists():
            raise FileNotFoundError(f"no such NIfTI file: {str(path)!r}")
        reader = NibabelReader()  # nibabel maps uncompressed files copy-on-write by default
        image = reader.read(path)
        if path.name.endswith(".nii.gz"):
            image = _with_voxels_from_itk(image, path)
        array, meta = reader.get_data(image)
        array = _native_with_dtype(np.asanyarray(array), self.dtype)
        meta = switch_endianness(meta, "<")
        meta[ImageMetaKey.FILENAME_OR_OBJ] = str(filename)
        if not self.keep_header:
            meta = {key: value for key, value in meta.items() if key in STRUCTURAL_KEYS}
        volume = MetaTensor(torch.from_numpy(array), meta=meta)
        volume.affine = meta[MetaKeys.AFFINE]
        if self.ensure_channel_first:
            volume = _channel_first(volume)
        return volume


def _with_voxels_from_itk(image: nib.Nifti1Image, path: Path) -> nib.Nifti1Image:
    """Return ``image`` (same header and affine) holding its voxels decompressed by ITK, in file order.

    Only for unscaled 2-D to 4-D NIfTI-1 images that ITK reads as scalar images with the stored dtype and shape;
    otherwise ``image`` unchanged (nibabel then reads it). ITK's NIfTI reader does not open compressed NIfTI-2
    files. A 4-D file (e.g. channels last) has the same layout in ITK's buffer as in the file: a 192 x 192 x
    160 x 4 float32 subject of the queue benchmark (``bench_queue.py --channels 4``) took 118-129 ms of CPU
    against nibabel's 433-470 ms (284-350 against 433-437 ms for random values, which hardly compress).
    """
    proxy = image.dataobj
    if not (nib.arrayproxy.is_proxy(proxy) and proxy.slope == 1 and proxy.inter == 0 and len(image.shape) in (2, 3, 4)):
        return image
    if isinstance(image.header, nib.Nifti2Header):
        return image
    import itk  # here, not at the top: importing ITK takes ~0.5 s, which every importer of the package would pay

    with warnings.catch_warnings():
        # ITK loads its SWIG modules lazily, on the first read; their import raises DeprecationWarnings, which
        # under warnings-as-errors abort the import inside C code and crash the process
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            read = itk.imread(os.fspath(path))
        except itk.TemplateTypeError:  # a voxel type this ITK build does not wrap (e.g. int8): nibabel reads it
            return image
    if read.GetNumberOfComponentsPerPixel() != 1:  # a vector image: its buffer interleaves the components
        return image
    voxels = itk.array_view_from_image(read).T  # C order reversed: file order
    if voxels.shape != image.shape or voxels.dtype != image.get_data_dtype().newbyteorder("="):
        return image
    return image.__class__(voxels, image.affine, image.header)


def _numpy_dtype(dtype: object) -> np.dtype:
    try:
        return np.dtype(get_equivalent_dtype(dtype, np.ndarray))
    except TypeError as error:
        raise TypeError(f"`dtype` should be a numpy or torch dtype or its name, but got dtype={dtype!r}") from error


def _native_with_dtype(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """Return ``array`` unchanged (still mapped) when it already has ``dtype`` in native byte order, else a copy.

    Unsigned integers wider than a byte become the signed type MONAI's ``LoadImage`` gives them (uint16 -> int32,
    uint32 and uint64 -> int64): torch has next to no arithmetic for its unsigned 16-64-bit types.
    """
    target = np.dtype(array.dtype.newbyteorder("=") if dtype is None else dtype)
    target = np.dtype(UNSUPPORTED_TYPES.get(target, target))
    if array.dtype == target and array.dtype.isnative:
        return array
    return array.astype(target, order="K")


def _channel_first(volume: MetaTensor) -> MetaTensor:
    """Move or add the channel axis as ``EnsureChannelFirst`` does, as a view of the mapped voxels.

    (``EnsureChannelFirst`` itself returns a C-contiguous copy, which would read the whole volume.)
    """
    channel_dim = volume.meta.get(MetaKeys.ORIGINAL_CHANNEL_DIM, float("nan"))
    return volume.unsqueeze(0) if is_no_channel(channel_dim) else volume.movedim(int(channel_dim), 0)


class LoadMappedNiftid(MapTransform):
    """Dictionary version of :class:`LoadMappedNifti`: replace each key's file path by its (mapped) volume.

    Args:
        keys: the keys holding NIfTI file paths.
        dtype: the output dtype for every key, as ``LoadImaged``'s (default float32); None keeps the stored one.
        ensure_channel_first: add a leading channel axis to volumes without one.
        keep_header: keep the raw NIfTI header fields in the metadata, as ``LoadImaged`` does; False keeps only
            :data:`STRUCTURAL_KEYS`.
        allow_missing_keys: skip keys missing from the data instead of raising a KeyError.

    A key that fails to load raises with the key and the file in the message.

    Example:
        >>> import tempfile, nibabel as nib
        >>> folder = Path(tempfile.mkdtemp())
        >>> nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), folder / "image.nii")
        >>> nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), folder / "label.nii")
        >>> load = LoadMappedNiftid(["image", "label"], dtype=None, ensure_channel_first=True)
        >>> subject = load({"image": folder / "image.nii", "label": folder / "label.nii"})
        >>> subject["image"].dtype, subject["label"].dtype, tuple(subject["label"].shape)
        (torch.float32, torch.uint8, (1, 8, 8, 8))
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        dtype: object = np.float32,
        ensure_channel_first: bool = False,
        keep_header: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMappedNifti(dtype=dtype, ensure_channel_first=ensure_channel_first, keep_header=keep_header)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Return a copy of ``data`` with each key's path replaced by its volume."""
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.loader(d[key])
            except (OSError, TypeError, ValueError) as error:
                raise _naming_key(error, key) from error
        return d


def _naming_key(error: Exception, key: Hashable) -> Exception:
    """Return an exception of ``error``'s type whose message starts with ``key``, or ``error`` itself when its
    type cannot be built from a message alone."""
    try:
        return type(error)(f"key {key!r}: {error}")
    except Exception:
        return error
