"""Patches laid out in the order they will be served, so that a batch of them is a slice, not a copy.

The queue pops patches from its buffer in the background (a thread of the training process when it has
workers). :class:`PatchSlab` copies each popped patch into the next slot of a *slab*: for every tensor entry,
one tensor holding the next few patches in serving order; and once the slab is full it collates the
metadata of each MetaTensor entry for all its patches at once (one stack per header field per slab instead of
one per field per batch). The patches it returns are :class:`ServedPatch` dicts whose tensors and metadata
tensors are views of the slab, so :mod:`.served_collate` can hand torch's ``default_collate`` slices of the
slab instead of stacking every patch and every header field on the training thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import default_collate

__all__ = ["PatchSlab", "ServedPatch", "SlabMeta"]

_PRECOLLATED_SCALARS = (bool, int, float, str)
"""Immutable metadata values whose collation (a tensor or a list) depends only on their type."""


class ServedPatch(dict):
    """A patch dict served by the queue, whose tensors are views of a :class:`PatchSlab`.

    It is a plain ``dict`` to read and modify; ``slab`` and ``index`` locate it in its slab and ``served``
    records the tensors (and metadata entries) it was served with, so that collation can tell whether the
    patch is still as served. Copies and pickles are plain dicts.

    Example:
        >>> import pickle
        >>> slab = PatchSlab(capacity=2)
        >>> slab.add({"x": torch.zeros(3)}); slab.add({"x": torch.ones(3)})
        >>> patches = slab.served()
        >>> type(patches[1]).__name__, patches[1].index, type(pickle.loads(pickle.dumps(patches[1]))).__name__
        ('ServedPatch', 1, 'dict')
    """

    __slots__ = ("index", "served", "slab")

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)

    def intact(self) -> bool:
        """Whether every stacked entry (and its metadata) is the object it was served with."""
        for key, value, meta in self.served:
            if self.get(key) is not value:
                return False
            if meta is not None:
                current = value.meta
                if len(current) != len(meta) or any(current.get(name) is not entry for name, entry in meta.items()):
                    return False
        return True


class SlabMeta:
    """The metadata of one MetaTensor entry for all the patches of a slab, collated as MONAI collates a batch.

    ``collated`` maps each metadata key to a tensor or list with one row per patch; ``signature`` describes the
    entries (key, type, dtype, shape), so that rows of two slabs are joined only when a batch of patches from
    both would collate alike.
    """

    def __init__(self, collated: dict, signature: tuple) -> None:
        self.collated = collated
        self.signature = signature


class PatchSlab:
    """Copy patches, in serving order, into one tensor per entry; then serve them as views.

    Entries stacked are the tensors (plain or MetaTensor, on the CPU) of the first patch; a later patch whose
    entry differs in type, shape or dtype leaves that entry out of the slab (its patches keep their own
    tensors). Copies go through NumPy, in the calling thread (see :func:`.transport._copied` on why).

    Args:
        capacity: patches the slab holds.

    Example:
        >>> slab = PatchSlab(capacity=2)
        >>> slab.add({"x": torch.zeros(3), "id": 0}); slab.add({"x": torch.ones(3), "id": 1})
        >>> first, second = slab.served()
        >>> second["x"].untyped_storage().data_ptr() == first["x"].untyped_storage().data_ptr(), second["id"]
        (True, 1)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: dict[str, torch.Tensor] = {}
        self.meta: dict[str, SlabMeta] = {}
        self._types: dict[str, type] = {}  # MetaTensor or plain: what each stack's views are served as
        self._patches: list[dict] = []

    def __len__(self) -> int:
        return len(self._patches)

    @property
    def full(self) -> bool:
        return len(self._patches) == self.capacity

    def add(self, patch: Mapping) -> None:
        """Copy ``patch``'s stacked entries into the next slot; the patch keeps views of the slab."""
        index = len(self._patches)
        if index == self.capacity:
            raise IndexError(f"this PatchSlab holds {self.capacity} patches already")
        if not index:
            self.data = {key: _empty_stack(value, self.capacity) for key, value in patch.items() if _stackable(value)}
            self._types = {key: type(patch[key]) for key in self.data}
        served = dict(patch)
        for key, stack in list(self.data.items()):
            value = patch.get(key)
            if not (_stackable(value) and type(value) is self._types[key] and _same_layout(value, stack)):
                del self.data[key]  # left to per-patch collation; patches placed already stay valid views
                continue
            view = stack[index]
            _copy_into(view, value)
            served[key] = _like(view, value)
        self._patches.append(served)

    def served(self) -> list[ServedPatch]:
        """Return the patches as :class:`ServedPatch` dicts, their metadata collated per slab.

        The slab keeps no reference to them: it lives as long as a patch or batch of it does.
        """
        count = len(self._patches)
        if count < self.capacity:
            self.data = {key: stack[:count] for key, stack in self.data.items()}
        for key in self.data:
            if isinstance(self._patches[0][key], MetaTensor):
                self._collate_meta(key)
        patches, self._patches = self._patches, []
        served = []
        for index, patch in enumerate(patches):
            out = ServedPatch(patch)
            out.slab, out.index = self, index
            out.served = tuple((key, out[key], dict(out[key].meta) if key in self.meta else None) for key in self.data)
            served.append(out)
        return served

    def _collate_meta(self, key: str) -> None:
        metas = [patch[key].meta for patch in self._patches]
        signature = _signature(metas[0])
        if signature is None or any(_signature(meta) != signature for meta in metas[1:]):
            return  # collated per batch, the usual way
        collated = default_collate(metas)
        self.meta[key] = SlabMeta(collated, signature)
        rows = {name: value.unbind(0) for name, value in collated.items() if isinstance(value, torch.Tensor)}
        for index, patch in enumerate(self._patches):
            meta = dict(metas[index])
            for name, original in meta.items():
                if isinstance(original, torch.Tensor):
                    meta[name] = rows[name][index]
                elif isinstance(original, np.ndarray):
                    meta[name] = rows[name][index].numpy()
            patch[key].meta = meta  # the rows themselves, so in-place edits reach the collated metadata


def _stackable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.requires_grad


def _same_layout(value: torch.Tensor, stack: torch.Tensor) -> bool:
    return value.dtype == stack.dtype and value.shape == stack.shape[1:]


def _empty_stack(value: torch.Tensor, capacity: int) -> torch.Tensor:
    return torch.empty((capacity, *value.shape), dtype=value.dtype)


def _copy_into(view: torch.Tensor, value: torch.Tensor) -> None:
    source = value.as_tensor() if isinstance(value, MetaTensor) else value
    try:
        np.copyto(view.numpy(), source.numpy())
    except TypeError:  # dtypes NumPy lacks (e.g. bfloat16)
        view.copy_(source)


def _like(view: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Return ``view`` as the same kind of tensor as ``value``, a MetaTensor carrying its metadata and trace."""
    if not isinstance(value, MetaTensor):
        return view
    out = view.as_subclass(type(value))
    out.__dict__.update(value.__dict__)
    return out


def _signature(meta: Mapping) -> tuple | None:
    """Describe ``meta``'s entries, or return None when one has a type collated otherwise than per row."""
    if not meta:
        return None
    entries = []
    for name, value in meta.items():
        if type(value) is torch.Tensor or (isinstance(value, np.ndarray) and value.dtype.kind in "biufc"):
            entries.append((name, type(value), value.dtype, tuple(value.shape)))
        elif isinstance(value, _PRECOLLATED_SCALARS) or (isinstance(value, np.generic) and value.dtype.kind in "biufc"):
            entries.append((name, type(value), None, None))
        else:
            return None
    return tuple(entries)
