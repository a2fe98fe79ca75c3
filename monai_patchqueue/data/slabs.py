"""Patches laid out in the order they will be served, so that a batch of them is a slice, not a copy.

The queue pops patches from its buffer in the background (a thread of the training process when it has
workers). :class:`PatchSlab` copies each popped patch into the next slot of a *slab*: for every tensor entry,
one tensor holding the next few patches in serving order; and once the slab is full it collates the
metadata of each MetaTensor entry for all its patches at once (one stack per header field per slab instead of
one per field per batch). The patches it returns are :class:`ServedPatch` dicts whose tensors and metadata
tensors are views of the slab, so :mod:`.served_collate` can hand torch's ``default_collate`` slices of the
slab instead of stacking every patch and every header field on the training thread. :class:`CollationProbe`
tells the queue whether its batches are collated that way, so that it lays patches out only while they are.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import default_collate

from .transport import copy_in_this_thread

__all__ = ["CollationProbe", "PatchSlab", "ServedPatch", "SlabMeta"]

_ROWS_REMEMBERED = 8
"""Row bounds of the last batches a probe remembers: those a slab of up to 16 patches will likely be asked for."""

_PRECOLLATED_SCALARS = (bool, int, float, str)
"""Immutable metadata values whose collation (a tensor or a list) depends only on their type."""


_NOTHING = itertools.repeat(object())
"""The default of every lookup :meth:`ServedPatch.intact` makes: a removed entry never matches, not even a None."""


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
                names, entries = meta
                current = value.meta
                if len(current) != len(names) or not all(map(operator.is_, map(current.get, names, _NOTHING), entries)):
                    return False
        return True


def _snapshot(meta: dict) -> tuple[tuple, tuple]:
    """Return ``meta``'s keys and values as two tuples, which :meth:`ServedPatch.intact` compares by identity
    in C (``map`` over ``operator.is_``): 9.5 instead of 13.7 microseconds per patch of image and label with
    45-entry NIfTI headers."""
    return tuple(meta), tuple(meta.values())


class CollationProbe:
    """Tell whether the consumer collates its batches from the slabs, so that laying patches out in them pays.

    Only torch's ``default_collate`` (torch's DataLoader) collates from slabs. MONAI's ``list_data_collate``
    (MONAI's DataLoader and ThreadDataLoader) collates key by key and copies the rows once more, so copying
    patches into slabs first would only add work. The consumer counts the patches it takes
    (:meth:`took`) and the collation marks when it used a slab (:meth:`collated`); :meth:`wants_slab` says yes
    at first, while a batch came from a slab within the last ``window`` patches taken, and otherwise for one
    chunk in ``probe_every`` and the first chunk of each epoch (:meth:`new_epoch`), so that a consumer that
    starts collating from slabs is noticed.

    Example:
        >>> probe = CollationProbe(window=32, probe_every=4)
        >>> probe.wants_slab()
        True
        >>> probe.took(40)
        >>> [probe.wants_slab() for _ in range(4)]
        [False, False, False, True]
        >>> probe.new_epoch(); probe.wants_slab(), probe.wants_slab()
        (True, False)
        >>> probe.collated(); probe.wants_slab()
        True
    """

    def __init__(self, window: int, probe_every: int) -> None:
        self.window = window
        self.probe_every = probe_every
        self._taken = 0
        self._last_collated = 0
        self._declined = 0
        self.rows_taken: list[tuple[int, int]] = []  # the last batches' rows, for the next slabs to prepare

    def took(self, count: int) -> None:
        self._taken += count

    def collated(self, rows: tuple[int, int] | None = None) -> None:
        """Note that a batch was collated from a slab: from its rows ``(start, stop)`` when it lay in one."""
        self._last_collated = self._taken
        if rows is not None:
            self.rows_taken.append(rows)
            del self.rows_taken[:-_ROWS_REMEMBERED]

    def new_epoch(self) -> None:
        """Make the next chunk a slab whatever the last ones showed."""
        self._declined = self.probe_every - 1

    def wants_slab(self) -> bool:
        if self._taken - self._last_collated < self.window:
            return True
        self._declined += 1
        if self._declined < self.probe_every:
            return False
        self._declined = 0
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
        self._rows: dict[tuple[int, int], dict] = {}

    def rows(self, start: int, stop: int) -> dict:
        """Return a new dict of each key's rows ``start:stop``, as a batch of those patches collates them.

        Slicing some 45 header tensors takes about 0.17 ms; :meth:`prepare` does it ahead, in the thread that
        lays the slab out, for the rows batches are expected to take. The dict and its lists are the batch's
        own; its tensors are views of the slab's, as they would be anyway.

        Example:
            >>> meta = SlabMeta({"affine": torch.eye(4).expand(4, 4, 4), "name": list("abcd")}, signature=())
            >>> rows = meta.rows(1, 3)
            >>> tuple(rows["affine"].shape), rows["name"]
            ((2, 4, 4), ['b', 'c'])
        """
        rows = self._sliced(start, stop)
        return {name: list(value) if isinstance(value, list) else value for name, value in rows.items()}

    def prepare(self, bounds: Iterable[tuple[int, int]]) -> None:
        """Slice the rows of each ``(start, stop)`` in ``bounds`` now, for :meth:`rows` to return later."""
        for start, stop in bounds:
            self._sliced(start, stop)

    def _sliced(self, start: int, stop: int) -> dict:
        """The rows ``start:stop`` of every key, sliced once per slab and kept (views: they hold no memory)."""
        rows = self._rows.get((start, stop))
        if rows is None:
            rows = self._rows[start, stop] = {name: value[start:stop] for name, value in self.collated.items()}
        return rows


class PatchSlab:
    """Copy patches, in serving order, into one tensor per entry; then serve them as views.

    Entries stacked are the tensors (plain or MetaTensor, on the CPU) of the first patch; a later patch whose
    entry differs in type, shape or dtype leaves that entry out of the slab (its patches keep their own
    tensors). Copies go through NumPy, in the calling thread (see :func:`.transport.copy_in_this_thread` on why).

    Args:
        capacity: patches the slab holds.
        probe: told when a batch is collated from the slab.

    Example:
        >>> slab = PatchSlab(capacity=2)
        >>> slab.add({"x": torch.zeros(3), "id": 0}); slab.add({"x": torch.ones(3), "id": 1})
        >>> first, second = slab.served()
        >>> second["x"].untyped_storage().data_ptr() == first["x"].untyped_storage().data_ptr(), second["id"]
        (True, 1)
    """

    def __init__(self, capacity: int, probe: CollationProbe | None = None) -> None:
        self.capacity = capacity
        self.probe = probe
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
            self.data = {
                key: _empty_stack(_plain(value), self.capacity)
                for key, value in patch.items()
                if _stackable(_plain(value))
            }
            self._types = {key: type(patch[key]) for key in self.data}
        served = dict(patch)
        for key, stack in list(self.data.items()):
            value = patch.get(key)
            plain = _plain(value)
            if not (type(value) is self._types[key] and _stackable(plain) and _same_layout(plain, stack)):
                del self.data[key]  # left to per-patch collation; patches placed already stay valid views
                continue
            view = stack[index]
            copy_in_this_thread(plain, view)
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
        if self.probe is not None and self.meta:
            bounds = {(start, stop) for start, stop in tuple(self.probe.rows_taken) if stop <= count}
            for meta in self.meta.values():
                meta.prepare(bounds)
        patches, self._patches = self._patches, []
        served = []
        for index, patch in enumerate(patches):
            out = ServedPatch(patch)
            out.slab, out.index = self, index
            out.served = tuple(
                (key, out[key], _snapshot(out[key].meta) if key in self.meta else None) for key in self.data
            )
            served.append(out)
        return served

    def _collate_meta(self, key: str) -> None:
        metas = [patch[key].meta for patch in self._patches]
        names = tuple(metas[0])
        if not names or any(tuple(meta) != names for meta in metas[1:]):
            return  # collated per batch, the usual way
        groups = _HeaderGroups(metas)
        collated, signature = {}, []
        for position, name in enumerate(names):
            own = groups.own[position]
            values = [metas[index][name] for index in (range(len(metas)) if own else groups.representatives)]
            entries = {_field_signature(value) for value in values}
            if len(entries) != 1 or None in entries:
                return
            signature.append((name, *entries.pop()))
            collated[name] = _stacked(values) if own else groups.spread(_stacked(values))
        self.meta[key] = SlabMeta(collated, tuple(signature))
        # a patch's own values (affine, location) become rows of the slab's, so that in-place edits reach it;
        # values shared by several patches (a subject's header) stay shared, as they arrived: read-only
        own_names = [name for name, own in zip(names, groups.own) if own and isinstance(collated[name], torch.Tensor)]
        rows = {name: collated[name].unbind(0) for name in own_names}
        if not rows:
            return
        for index, patch in enumerate(self._patches):
            meta = dict(metas[index])
            for name, row in rows.items():
                meta[name] = row[index].numpy() if isinstance(meta[name], np.ndarray) else row[index]
            patch[key].meta = meta  # the rows themselves, so in-place edits reach the collated metadata


class _HeaderGroups:
    """The patches of a slab grouped by the metadata objects they share (in the queue, a subject's header).

    A field is a patch's ``own`` when no two patches hold the same object for it (affine, location); the others
    are described and stacked once per group (``representatives``: a patch of each) and ``spread`` to every row.
    """

    def __init__(self, metas: list[dict]) -> None:
        ids = [tuple(map(id, meta.values())) for meta in metas]
        self.own = [len(set(column)) == len(metas) for column in zip(*ids)]
        shared = [position for position, own in enumerate(self.own) if not own]
        group_key = (lambda _: ()) if not shared else operator.itemgetter(*shared)
        first_of: dict = {}
        self.group_of = [first_of.setdefault(group_key(row), len(first_of)) for row in ids]
        self.representatives = [self.group_of.index(group) for group in range(len(first_of))]
        self._rows = torch.tensor(self.group_of)

    def spread(self, collated: Any) -> Any:
        """Rows per group to rows per patch."""
        if len(self.representatives) == len(self.group_of):
            return collated
        if isinstance(collated, torch.Tensor):
            return collated[self._rows]
        return [collated[group] for group in self.group_of]


def _stacked(values: list) -> Any:
    """``default_collate`` of one metadata field's values (tensors, numeric arrays or scalars)."""
    if isinstance(values[0], (torch.Tensor, np.ndarray)):
        return torch.stack([torch.as_tensor(value) for value in values])
    return default_collate(values)


def _field_signature(value: Any) -> tuple | None:
    """Describe a metadata value (type, dtype, shape), or return None when it is not collated per row."""
    if type(value) is torch.Tensor or (isinstance(value, np.ndarray) and value.dtype.kind in "biufc"):
        return type(value), value.dtype, tuple(value.shape)
    if isinstance(value, _PRECOLLATED_SCALARS) or (isinstance(value, np.generic) and value.dtype.kind in "biufc"):
        return type(value), None, None
    return None


def _stackable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.requires_grad


def _same_layout(value: torch.Tensor, stack: torch.Tensor) -> bool:
    return value.dtype == stack.dtype and value.shape == stack.shape[1:]


def _empty_stack(value: torch.Tensor, capacity: int) -> torch.Tensor:
    return torch.empty((capacity, *value.shape), dtype=value.dtype)


def _plain(value: Any) -> Any:
    """A MetaTensor's data as a plain tensor (whose attributes skip MONAI's ``__torch_function__``)."""
    return value.as_tensor() if isinstance(value, MetaTensor) else value


def _like(view: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Return ``view`` as the same kind of tensor as ``value``, a MetaTensor carrying its metadata and trace."""
    if not isinstance(value, MetaTensor):
        return view
    out = view.as_subclass(type(value))
    out.__dict__.update(value.__dict__)
    return out
