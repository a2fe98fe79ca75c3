"""Where the samplers write the patches they cut: fresh tensors, or memory that the caller lends.

By default every patch gets its own tensor. Code that moves the patches on at once can lend memory for them
with :func:`patches_written_to`: the patch queue's workers lend the shared-memory block that carries a subject's
patches to the training process, so that a patch is written once, where it travels, instead of being cut into
a fresh tensor and then copied into the block.

A lender is any object with ``stack(count, shape, dtype)``, which returns a C-contiguous ``(count, *shape)``
tensor of ``dtype`` on the CPU or None when it has no room (the patches then get tensors of their own), and
``holds(tensor)``, which says whether a tensor lies in the memory it lent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch

__all__ = ["PatchMemoryLender", "new_patch_tensors", "patches_written_to"]


class PatchMemoryLender(Protocol):
    """What :func:`patches_written_to` needs of a lender (see the module docstring)."""

    def stack(self, count: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None: ...

    def holds(self, tensor: torch.Tensor) -> bool: ...


_lender: ContextVar[PatchMemoryLender | None] = ContextVar("monai_patchqueue_patch_memory", default=None)


@contextmanager
def patches_written_to(lender: PatchMemoryLender | None) -> Iterator[None]:
    """Have the samplers called inside the ``with`` block write their patches into memory from ``lender``
    (None: into tensors of their own, as outside any such block)."""
    token = _lender.set(lender)
    try:
        yield
    finally:
        _lender.reset(token)


def new_patch_tensors(
    count: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """Return ``count`` uninitialised C-contiguous tensors of ``shape``: consecutive slots of one lent stack when
    a lender is active and has room (CPU only), otherwise tensors of their own.

    Example:
        >>> [tuple(t.shape) for t in new_patch_tensors(2, (1, 4, 4), torch.float32)]
        [(1, 4, 4), (1, 4, 4)]
    """
    shape = tuple(int(s) for s in shape)
    lender = _lender.get()
    if lender is not None and torch.device(device).type == "cpu" and count > 0:
        stacked = lender.stack(count, shape, dtype)
        if stacked is not None:
            return list(stacked.unbind(0))
    return [torch.empty(shape, dtype=dtype, device=device) for _ in range(count)]
