"""Where the samplers write the patches they cut (fresh tensors, or memory that the caller lends), and whether
the patches of one call share their copied metadata.

By default every patch gets its own tensor. Code that moves the patches on at once can lend memory for them
with :func:`patches_written_to`: the patch queue's workers lend the shared-memory block that carries a subject's
patches to the training process, so that a patch is written once, where it travels, instead of being cut into
a fresh tensor and then copied into the block.

A lender is any object with ``stack(count, shape, dtype)``, which returns a C-contiguous ``(count, *shape)``
tensor of ``dtype`` on the CPU or None when it has no room (the patches then get tensors of their own), and
``holds(tensor)``, which says whether a tensor lies in the memory it lent.

Each patch also gets its own copy of the source's metadata arrays (a NIfTI header holds some 40), so that
patches never share mutable state. Code that packs a call's patches at once, and reads their metadata without
changing it, can have them share one copy instead with :func:`patch_metadata_shared`: the patch queue's workers
do when their sampler is one of the package's and no ``patch_transform`` runs between sampling and packing,
which sends values the patches share once per subject anyway.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch

__all__ = [
    "PatchMemoryLender",
    "new_patch_tensors",
    "patch_metadata_is_shared",
    "patch_metadata_shared",
    "patches_written_to",
]


class PatchMemoryLender(Protocol):
    """What :func:`patches_written_to` needs of a lender (see the module docstring)."""

    def stack(self, count: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None: ...

    def holds(self, tensor: torch.Tensor) -> bool: ...


_lender: ContextVar[PatchMemoryLender | None] = ContextVar("monai_patchqueue_patch_memory", default=None)
_metadata_shared: ContextVar[bool] = ContextVar("monai_patchqueue_patch_metadata_shared", default=False)


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


@contextmanager
def patch_metadata_shared(shared: bool = True) -> Iterator[None]:
    """Have the samplers called inside the ``with`` block give the patches of one call one shared copy of the
    source's metadata values (each patch still gets its own dict, affine and location), or with ``shared``
    False a copy each, as outside any such block.

    Example:
        >>> import numpy as np
        >>> from monai.data import MetaTensor
        >>> from monai_patchqueue.transforms.functional import crop_patches
        >>> image = MetaTensor(torch.zeros(1, 4, 4), meta={"pixdim": np.ones(3)})
        >>> with patch_metadata_shared():
        ...     patches = crop_patches(image, np.array([[0, 0, 2, 2], [2, 2, 4, 4]]))
        >>> patches[0].meta["pixdim"] is patches[1].meta["pixdim"], patches[0].meta["pixdim"] is image.meta["pixdim"]
        (True, False)
    """
    token = _metadata_shared.set(shared)
    try:
        yield
    finally:
        _metadata_shared.reset(token)


def patch_metadata_is_shared() -> bool:
    """Whether the samplers' patches of one call share one copy of the metadata values (see
    :func:`patch_metadata_shared`)."""
    return _metadata_shared.get()
