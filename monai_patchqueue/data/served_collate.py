"""Collate a batch of the queue's patches from their slabs: slices where torch would stack.

torch's ``default_collate`` stacks every tensor of a batch and, with MONAI's MetaTensor collation, every
header field of every MetaTensor (about 40 for a NIfTI image): some 90 stacks and 10 MB of copies per batch of
8 patches of 64^3 image and label, 2-5 ms on the training thread between two steps when the loader is torch's
plain ``DataLoader``. The queue serves :class:`~.slabs.ServedPatch` dicts laid out in serving order in slabs
(:mod:`.slabs`), and :func:`collate_served_patches`, registered for them with ``default_collate``, returns for
each stacked entry the slab's rows: a view when the batch lies in one slab, one ``torch.cat`` when it spans
several. The result equals MONAI's collation (same values, dtypes, metadata, trace, ``is_batch``); a batch's
tensors share memory with its patches, as views do. Patches changed after they were served, and entries the
slab does not hold, are collated the usual way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data import MetaTensor
from monai.utils import TraceKeys
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from .slabs import PatchSlab, ServedPatch

__all__ = ["collate_served_patches", "register_served_collation"]

_DEFAULT_SPATIAL_NDIM = 3  # MONAI's collation assumes it for tensors without a spatial rank


def register_served_collation() -> None:
    """Have ``torch.utils.data.default_collate`` collate the queue's patches with :func:`collate_served_patches`."""
    default_collate_fn_map[ServedPatch] = collate_served_patches


def collate_served_patches(batch: Sequence[dict], *, collate_fn_map: dict[type, Callable] | None = None) -> dict:
    """Collate ``batch``, patch dicts served by the queue, as ``default_collate`` does, from their slabs.

    Example:
        >>> from monai_patchqueue.data.slabs import PatchSlab
        >>> slab = PatchSlab(capacity=4)
        >>> for i in range(4):
        ...     slab.add({"x": torch.full((2,), float(i)), "id": i})
        >>> patches = slab.served()
        >>> batch = collate_served_patches(patches[1:3])
        >>> batch["x"].tolist(), batch["id"].tolist(), batch["x"].data_ptr() == patches[1]["x"].data_ptr()
        ([[1.0, 1.0], [2.0, 2.0]], [1, 2], True)
    """
    collate_fn_map = default_collate_fn_map if collate_fn_map is None else collate_fn_map
    runs = _runs(batch)
    if runs is not None and runs[-1][0].probe is not None:
        runs[-1][0].probe.collated(runs[0][1:] if len(runs) == 1 else None)
    out = {}
    for key in batch[0]:
        values = [patch[key] for patch in batch]
        joined = None if runs is None else _joined(key, runs, values)
        out[key] = collate(values, collate_fn_map=collate_fn_map) if joined is None else joined
    return out


def _runs(batch: Sequence[dict]) -> list[tuple[PatchSlab, int, int]] | None:
    """Return the batch as runs ``(slab, start, stop)`` of consecutive slab rows, or None when a patch is not
    one the queue served or was changed since."""
    runs: list[list] = []
    for patch in batch:
        if type(patch) is not ServedPatch or not patch.intact():
            return None
        if runs and runs[-1][0] is patch.slab and runs[-1][2] == patch.index:
            runs[-1][2] += 1
        else:
            runs.append([patch.slab, patch.index, patch.index + 1])
    return [tuple(run) for run in runs]


def _joined(key: str, runs: list[tuple[PatchSlab, int, int]], values: list) -> torch.Tensor | None:
    """Return the collated ``key`` from the runs' slabs, or None when a slab does not hold it (alike)."""
    stacks = [slab.data.get(key) for slab, _, _ in runs]
    first = stacks[0]
    if any(stack is None or stack.dtype != first.dtype or stack.shape[1:] != first.shape[1:] for stack in stacks):
        return None
    if not isinstance(values[0], MetaTensor):
        return _rows(stacks, runs)
    metas = [slab.meta.get(key) for slab, _, _ in runs]
    if any(meta is None or meta.signature != metas[0].signature for meta in metas):
        return None
    out = _rows(stacks, runs).as_subclass(type(values[0]))
    if len(runs) == 1:  # sliced ahead by the thread that laid the slab out, where batches take the same rows
        out.meta = metas[0].rows(*runs[0][1:])
    else:
        out.meta = {name: _rows([meta.collated[name] for meta in metas], runs) for name in metas[0].collated}
    out.applied_operations = [value.applied_operations or TraceKeys.NONE for value in values]
    out.is_batch = True
    spatial_ndim = min(getattr(value, "spatial_ndim", _DEFAULT_SPATIAL_NDIM) for value in values)
    out.spatial_ndim = min(spatial_ndim, max(out.ndim - 1, 1))
    return out


def _rows(parts: list, runs: list[tuple[PatchSlab, int, int]]):
    """Rows ``start:stop`` of each part (tensors or lists, one per run), joined."""
    if len(runs) == 1:
        _, start, stop = runs[0]
        return parts[0][start:stop]
    pieces = [part[start:stop] for part, (_, start, stop) in zip(parts, runs)]
    if isinstance(pieces[0], torch.Tensor):
        return torch.cat(pieces)
    return [row for piece in pieces for row in piece]
