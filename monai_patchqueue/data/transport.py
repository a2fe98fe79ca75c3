"""Pack a subject's patches for the trip from a worker process to the training process, and unpack them.

Sharing a tensor between processes costs a file-descriptor handshake per storage (about a millisecond), and
a patch dict holds several (image, label, location, affines in the metadata). :class:`PatchPack` stacks every
key into one block of memory and pickles the metadata and other entries into bytes, with small tensors as NumPy
arrays, so a subject's patches cross in one shared storage whatever their number; in a worker the block comes
from the worker's reusable shared-memory blocks (:mod:`.shared_blocks`).
"""

from __future__ import annotations

import copyreg
import io
import math
import pickle
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.data import MetaTensor

from ..transforms.functional import new_metatensor
from .block_lender import BlockLender
from .shared_blocks import aligned, block_view, mapped_block, return_block

if TYPE_CHECKING:
    from .block_pins import BlockPins

__all__ = ["PatchPack", "copy_in_this_thread", "pack_nbytes"]


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


_MISSING = object()


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return _array_identity(a) == _array_identity(b)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (np.ndarray, torch.Tensor)) or isinstance(b, (np.ndarray, torch.Tensor)):
        return False
    try:
        return type(a) is type(b) and (bool(a == b) or _both_nan(a, b))
    except Exception:  # values whose comparison is not a plain bool
        return False


def _array_identity(array: np.ndarray) -> tuple:
    """Return what makes two arrays the same metadata value: dtype, shape and bytes (NaN fields compare equal)."""
    return array.dtype, array.shape, array.tobytes()


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
    first, others = metas[0], metas[1:]
    shared = {key: value for key, value in first.items() if _held_by_all(others, key, value)}
    return shared, [{key: value for key, value in m.items() if key not in shared} for m in metas]


def _held_by_all(metas: list[dict], key: str, value: object) -> bool:
    """Whether every dict of ``metas`` holds ``value``, or a value :func:`_same` as it, under ``key``."""
    if not isinstance(value, np.ndarray):
        return all(key in m and _same(m[key], value) for m in metas)
    identity = _array_identity(value)  # once, not once per dict: a header holds some 40 small arrays
    for m in metas:
        other = m.get(key, _MISSING)
        if other is not value and not (isinstance(other, np.ndarray) and _array_identity(other) == identity):
            return False
    return True


def _stackable(values: list) -> bool:
    first = values[0]
    if not isinstance(first, torch.Tensor):
        return False
    with torch._C.DisableTorchFunctionSubclass():  # `shape` and `dtype` of MetaTensors, without MONAI's dispatch
        return all(
            type(value) is type(first) and value.shape == first.shape and value.dtype == first.dtype for value in values
        )


def copy_in_this_thread(source: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return a copy of ``source`` (written into ``out`` when given) made by plain memory copies in this thread.

    torch splits a copy this large across its intra-op threads, whose spinning afterwards (OpenMP's default
    wait policy) took more CPU from the workers than the copy itself on a 2-core machine; NumPy copies in the
    calling thread. Dtypes NumPy lacks (e.g. bfloat16) are copied by torch.

    Example:
        >>> out = torch.zeros(3)
        >>> copy_in_this_thread(torch.arange(3.0), out) is out, out.tolist()
        (True, [0.0, 1.0, 2.0])
        >>> halves = torch.ones(2, dtype=torch.bfloat16)  # a dtype NumPy lacks: torch copies it
        >>> copy_in_this_thread(halves).tolist(), copy_in_this_thread(halves, torch.zeros_like(halves)).tolist()
        ([1.0, 1.0], [1.0, 1.0])
    """
    try:
        if out is None:
            return torch.from_numpy(source.numpy().copy())
        np.copyto(out.numpy(), source.numpy())
        return out
    except TypeError:
        return source.clone() if out is None else out.copy_(source)


def _check_on_cpu(key: str, tensor: torch.Tensor) -> None:
    """Raise a ValueError naming ``key`` if the patches' tensor is not on the CPU.

    Patches cross from a worker in shared CPU memory. A CUDA tensor could cross by CUDA IPC, but it stays valid
    only while the worker that made it lives, and the queue's workers end with the queue, while the training
    process may still hold the patches: not a risk to take silently.
    """
    if tensor.device.type != "cpu":
        raise ValueError(
            f"`{key}` of the patches is on {tensor.device}, but the queue's worker processes can only send CPU "
            f"tensors to the training process (a GPU tensor shared across processes is valid only while the "
            f"worker that made it lives): move patches to the GPU in the training loop (e.g. "
            f"batch[{key!r}].to(device)), or use num_workers=0 to run GPU transforms in the training process"
        )


def _with_trace(view: torch.Tensor, trace: tuple, index: int) -> MetaTensor:
    shared, own, operations = trace
    return new_metatensor(view, {**shared, **own[index]}, operations[index])


class PatchPack:
    """A subject's patch dicts as one stacked tensor per key plus pickled metadata.

    The stacked tensors share one block of memory: in a worker process a shared-memory block from ``blocks``
    (see :mod:`.shared_blocks`), which crosses to the training process as a single storage; there,
    :meth:`unpack` serves views of the block or copies the patches out, and the block goes back to its
    worker. With a ``lender`` (see :mod:`.block_lender`) the pack takes the lender's block: patches the
    samplers cut into it stay where they are, the other entries are copied behind them; when they do not fit,
    the lender's block is released and the pack takes one from ``blocks``.

    Example:
        >>> patches = [{"image": torch.full((1, 2, 2), float(i)), "id": i} for i in range(3)]
        >>> unpacked = PatchPack(patches).unpack()
        >>> [(float(p["image"].sum()), p["id"]) for p in unpacked]
        [(0.0, 0), (4.0, 1), (8.0, 2)]
    """

    def __init__(
        self, patches: list[Mapping], blocks: Callable[[int], tuple] | None = None, lender: BlockLender | None = None
    ) -> None:
        self.count = len(patches)
        keys = list(patches[0]) if patches else []
        same_keys = all(list(patch) == keys for patch in patches)
        for patch in patches:
            for key, value in patch.items():
                if isinstance(value, torch.Tensor):
                    _check_on_cpu(key, value)
        stacks: dict[str, list[torch.Tensor]] = {}
        traces: dict = {}
        for key in keys if same_keys else []:
            values = [patch[key] for patch in patches]
            if _stackable(values):
                plain = [value.as_tensor() if isinstance(value, MetaTensor) else value.detach() for value in values]
                stacks[key] = plain
                if isinstance(values[0], MetaTensor):
                    shared, own = _split_shared([value.meta for value in values])
                    traces[key] = (shared, own, [value.applied_operations for value in values])
        rest = [{key: value for key, value in patch.items() if key not in stacks} for patch in patches]
        self.metadata = _dumps((keys if same_keys else None, traces, rest))  # first: it may fail, blocks would leak
        in_place = self._place(stacks, blocks, lender)
        self.copied_keys = tuple(key for key in self.layout if key not in in_place)  # the others were cut in place
        for key in self.copied_keys:
            torch.stack(stacks[key], out=block_view(self.block, *self.layout[key]))
        self._received = False

    def _place(self, stacks: dict, blocks: Callable[[int], tuple] | None, lender: BlockLender | None) -> dict:
        """Set the block, its ticket, the layout and its size in bytes; return the layout of the keys already in
        place (cut into the lender's block), which need no copy."""
        if lender is not None:
            in_place = lender.placed(stacks)
            rest, self.nbytes = _layout({key: stacks[key] for key in stacks if key not in in_place}, lender.nbytes)
            if self.nbytes <= lender.block.numel():
                self.layout, self.block, self.ticket = in_place | rest, lender.block, lender.ticket
                return in_place
            lender.release()
        self.layout, self.nbytes = _layout(stacks)
        if blocks is not None and stacks:
            self.block, self.ticket = blocks(self.nbytes)
        else:
            self.block, self.ticket = _plain_block(self.nbytes), None
        return {}

    def __getstate__(self) -> dict:
        state = {name: value for name, value in self.__dict__.items() if name != "_received"}
        if self.ticket is not None and self.ticket.mapped:  # the training process has it: the ticket is enough
            del state["block"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _received=True)
        if "block" not in state:
            self.block = mapped_block(self.ticket)

    def unpack(self, pins: BlockPins | None = None) -> list[dict]:
        """Return the patch dicts.

        In the process that packed them, their tensors are views into this pack's stacked tensors. A pack
        received from a worker serves views of the worker's block when ``pins`` lets it pin the block (see
        :mod:`.block_pins`: the block goes back to its worker once every view of it is gone); otherwise it
        copies each patch out (patch-sized copies, which the memory allocator serves from memory it holds,
        where one block-sized copy would fault in fresh pages) and hands the block back at once. Either way it
        can be unpacked once. Metadata values shared by all the patches (the file header) are shared objects,
        to be read, not modified; numeric NumPy values among them come back as tensors, as collation would
        make them.
        """
        if self.block is None:
            raise RuntimeError("this PatchPack was unpacked already and its worker has reused its memory")
        keys, traces, rest = pickle.loads(self.metadata)
        for shared, _, _ in traces.values():
            shared.update([(key, _collatable(value)) for key, value in shared.items()])
        copy_out = self._received and self.ticket is not None
        source = self.block
        if copy_out and pins is not None:
            pinned = pins.pinned(self.ticket, self.block, self.nbytes)
            if pinned is not None:  # the views keep the block; its finalizer hands it back
                source, copy_out, self.block, self.ticket = pinned, False, None, None
        stacked = {key: block_view(source, *where) for key, where in self.layout.items()}
        patches = []
        for index, others in enumerate(rest):
            patch = {}
            for key in keys or others:
                if key in stacked:
                    view = stacked[key][index]
                    view = copy_in_this_thread(view) if copy_out and key in self.layout else view
                    patch[key] = view if key not in traces else _with_trace(view, traces[key], index)
                else:
                    patch[key] = others[key]
            patches.append(patch)
        if copy_out:
            block, ticket, self.block, self.ticket = self.block, self.ticket, None, None
            return_block(ticket, block)
        return patches

    def __del__(self) -> None:
        ticket, block = getattr(self, "ticket", None), getattr(self, "block", None)
        if ticket is not None and block is not None and getattr(self, "_received", False):  # dropped unread
            return_block(ticket, block)  # the worker wants it back


def pack_nbytes(patch: Mapping, count: int) -> int:
    """Return the bytes of the block that carries ``count`` patches shaped like ``patch`` (its CPU tensors,
    stacked per key, each stack aligned as :class:`PatchPack` lays them out).

    Example:
        >>> pack_nbytes({"image": torch.zeros(1, 4, 4), "id": 3}, count=5)  # 5 x 64 bytes
        320
    """
    stacks = {key: [value] * count for key, value in patch.items()
              if isinstance(value, torch.Tensor) and value.device.type == "cpu"}  # fmt: skip
    return _layout(stacks)[1]


def _layout(stacks: dict[str, list[torch.Tensor]], start: int = 0) -> tuple[dict, int]:
    """Return each key's ``(dtype, byte offset, stacked shape)`` in one block from byte ``start`` on, and the
    bytes used up to the end of the last."""
    layout, offset = {}, aligned(start)
    for key, values in stacks.items():
        shape = (len(values), *values[0].shape)
        layout[key] = (values[0].dtype, offset, shape)
        offset = aligned(offset + math.prod(shape) * values[0].dtype.itemsize)
    return layout, offset


def _plain_block(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)
