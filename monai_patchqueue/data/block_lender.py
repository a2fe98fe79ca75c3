"""Lend a worker's shared-memory block to the samplers, so that a subject's patches are cut straight into it.

Without a lender a worker cuts each patch into a tensor of its own and :class:`~.transport.PatchPack` then
copies every patch into a shared block for the trip to the training process: one more pass over every voxel of
every patch. A :class:`BlockLender` hands the samplers (through :mod:`monai_patchqueue.transforms.patch_memory`)
consecutive slots of the block that will carry the subject; when the patches reach the pack unchanged, the pack
leaves them where they are (:meth:`BlockLender.placed`) and copies only the other entries (e.g. the patch
locations) behind them. Anything else (a sampler that allocates its own patches, such as MONAI's, a
``patch_transform`` that returns new tensors, a block too small) leaves the lent slots unused and the pack
copies as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from .shared_blocks import aligned, block_view

__all__ = ["BlockLender"]


class BlockLender:
    """Lend slots of ``block`` for one subject's patches; ``release`` gives the block back if no pack claims it.

    Args:
        block: 1-D uint8 tensor (a worker's shared block).
        ticket: what a pack that takes the block carries back with it (see :mod:`.shared_blocks`).
        release: called once by :meth:`release` to give an unclaimed block back to its pool.

    Example:
        >>> lender = BlockLender(torch.zeros(4096, dtype=torch.uint8), ticket=None, release=lambda: None)
        >>> stacked = lender.stack(2, (1, 4, 4), torch.float32)
        >>> patches = list(stacked.unbind(0))
        >>> lender.placed({"image": patches, "location": [torch.zeros(6), torch.ones(6)]})
        {'image': (torch.float32, 0, (2, 1, 4, 4))}
        >>> lender.placed({"image": patches[::-1]})  # not the lent slots in order: copied as before
        {}
    """

    def __init__(self, block: torch.Tensor, ticket: object, release: Callable[[], None]) -> None:
        self.block = block
        self.ticket = ticket
        self._release = release
        self._stacks: list[tuple[int, torch.Tensor]] = []  # (byte offset, lent stack)
        self.nbytes = 0  # bytes lent so far, from the start of the block

    def stack(self, count: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Return ``count`` slots of ``shape`` and ``dtype`` as one ``(count, *shape)`` view of the block, or None
        when the block has no room left for them."""
        offset = aligned(self.nbytes)
        end = offset + count * math.prod(shape) * dtype.itemsize
        if end > self.block.numel():
            return None
        stacked = block_view(self.block, dtype, offset, (count, *shape))
        self._stacks.append((offset, stacked))
        self.nbytes = end
        return stacked

    def holds(self, tensor: torch.Tensor) -> bool:
        """Return whether ``tensor`` lies in the block."""
        return tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() == self.block.data_ptr()

    def placed(self, stacks: Mapping[str, Sequence[torch.Tensor]]) -> dict:
        """Return ``(dtype, byte offset, stacked shape)`` in the block for each key whose tensors are exactly the
        slots of one lent stack, in order (the keys that need no copy)."""
        layout = {}
        for key, values in stacks.items():
            where = self._slots_holding(values)
            if where is not None:
                layout[key] = where
        return layout

    def _slots_holding(self, values: Sequence[torch.Tensor]) -> tuple | None:
        for offset, stacked in self._stacks:
            if len(values) != len(stacked):
                continue
            slot_bytes = stacked[0].numel() * stacked.element_size()
            if all(
                value.data_ptr() == stacked.data_ptr() + index * slot_bytes
                and value.shape == stacked.shape[1:]
                and value.dtype == stacked.dtype
                and value.is_contiguous()
                for index, value in enumerate(values)
            ):
                return stacked.dtype, offset, tuple(stacked.shape)
        return None

    def release(self) -> None:
        """Give the block back to its pool (once); for a block that no pack took."""
        release, self._release = self._release, None
        if release is not None:
            release()
