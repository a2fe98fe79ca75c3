"""Pack a subject's patches for the trip from a worker process to the training process, and unpack them.

Sharing a tensor between processes costs a file-descriptor handshake per storage (about a millisecond), and
a patch dict holds several (image, label, location, affines in the metadata). :class:`PatchPack` stacks every
key into one tensor and pickles the metadata and other entries into bytes, with small tensors as NumPy arrays,
so a subject's patches cross in a couple of shared storages whatever their number.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from collections.abc import Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import get_worker_info

from ..transforms.functional import new_metatensor

__all__ = ["PatchPack"]


def _tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def _reduce_small_tensor(tensor: torch.Tensor):
    try:
        return _tensor_from_numpy, (tensor.detach().cpu().numpy(),)
    except (TypeError, RuntimeError):  # dtypes NumPy lacks (e.g. bfloat16): torch's own pickling
        return tensor.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


class _MetadataPickler(pickle.Pickler):
    dispatch_table = copyreg.dispatch_table.copy()
    dispatch_table[torch.Tensor] = _reduce_small_tensor


def _dumps(obj: object) -> bytes:
    buffer = io.BytesIO()
    _MetadataPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (np.ndarray, torch.Tensor)) or isinstance(b, (np.ndarray, torch.Tensor)):
        return False
    try:
        return type(a) is type(b) and (bool(a == b) or _both_nan(a, b))
    except Exception:  # values whose comparison is not a plain bool
        return False


def _both_nan(a: object, b: object) -> bool:
    """True for two float NaNs (NIfTI headers hold NaN scale factors), which ``==`` calls different."""
    return isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)) and np.isnan(a) and np.isnan(b)


def _collatable(value: object) -> object:
    """Return a numeric NumPy header value as a tensor (zero-copy), anything else as it is.

    ``default_collate`` turns NumPy values into tensors one element at a time for every batch; converting a
    subject's shared header once here gives the same batches with a single stack per key.
    """
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc" and value.flags.writeable:
        return torch.from_numpy(value)
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return torch.as_tensor(value)
    return value


def _split_shared(metas: list[dict]) -> tuple[dict, list[dict]]:
    """Return the entries every meta dict has in common, and each dict's own remaining entries.

    A subject's patches share most of their metadata (the file header); sending it once per subject keeps the
    pickled metadata small. The shared values are read-only in the training process.
    """
    first = metas[0]
    shared = {key: value for key, value in first.items() if all(key in m and _same(m[key], value) for m in metas[1:])}
    return shared, [{key: value for key, value in m.items() if key not in shared} for m in metas]


def _stack_buffer(values: list[torch.Tensor]) -> torch.Tensor | None:
    """Return an empty tensor in shared memory for stacking ``values`` in a worker process, else None.

    Stacking straight into shared memory saves the copy that sending an ordinary tensor to another process
    makes (as ``default_collate`` does in DataLoader workers).
    """
    first = values[0]
    if get_worker_info() is None or first.device.type != "cpu":
        return None
    storage = first._typed_storage()._new_shared(len(values) * first.numel(), device=first.device)
    return first.new(storage).resize_(len(values), *first.shape)


def _stackable(values: list) -> bool:
    first = values[0]
    return isinstance(first, torch.Tensor) and all(
        type(value) is type(first) and value.shape == first.shape and value.dtype == first.dtype for value in values
    )


def _with_trace(view: torch.Tensor, trace: tuple, index: int) -> MetaTensor:
    shared, own, operations = trace
    return new_metatensor(view, {**shared, **own[index]}, operations[index])


class PatchPack:
    """A subject's patch dicts as one stacked tensor per key plus pickled metadata.

    Example:
        >>> patches = [{"image": torch.full((1, 2, 2), float(i)), "id": i} for i in range(3)]
        >>> unpacked = PatchPack(patches).unpack()
        >>> [(float(p["image"].sum()), p["id"]) for p in unpacked]
        [(0.0, 0), (4.0, 1), (8.0, 2)]
    """

    def __init__(self, patches: list[Mapping]) -> None:
        self.count = len(patches)
        keys = list(patches[0]) if patches else []
        same_keys = all(list(patch) == keys for patch in patches)
        self.tensors: dict = {}
        traces: dict = {}
        for key in keys if same_keys else []:
            values = [patch[key] for patch in patches]
            if _stackable(values):
                plain = [value.as_tensor() if isinstance(value, MetaTensor) else value.detach() for value in values]
                self.tensors[key] = torch.stack(plain, out=_stack_buffer(plain))
                if isinstance(values[0], MetaTensor):
                    shared, own = _split_shared([value.meta for value in values])
                    traces[key] = (shared, own, [value.applied_operations for value in values])
        rest = [{key: value for key, value in patch.items() if key not in self.tensors} for patch in patches]
        self.metadata = _dumps((keys if same_keys else None, traces, rest))

    def unpack(self) -> list[dict]:
        """Return the patch dicts; their tensors are views into this pack's stacked tensors.

        Metadata values shared by all the patches (the file header) are shared objects, to be read, not
        modified; numeric NumPy values among them come back as tensors, as collation would make them.
        """
        keys, traces, rest = pickle.loads(self.metadata)
        for shared, _, _ in traces.values():
            shared.update([(key, _collatable(value)) for key, value in shared.items()])
        patches = []
        for index, others in enumerate(rest):
            patch = {}
            for key in keys or others:
                if key in self.tensors:
                    view = self.tensors[key][index]
                    patch[key] = view if key not in traces else _with_trace(view, traces[key], index)
                else:
                    patch[key] = others[key]
            patches.append(patch)
        return patches
