"""Shared-memory blocks that a worker process reuses for the patches it sends back.

Fresh shared memory is slow to come by: creating a segment and faulting in its pages cost about 1 ms per MiB
on the benchmark machine, some 20 ms for a subject's sixteen 64^3 patches with their labels, more than cutting
them. So each worker keeps a few blocks (:class:`SharedBlocks`) and writes every subject's patches into a free
one; the training process either serves the patches as views of the block and returns it once they are all gone
(:mod:`.block_pins`, for a bounded number of blocks), or copies them out as it receives them (a plain memory
copy, several milliseconds per subject) and returns the block at once (:func:`return_block`), also for results it
drops unread. A block the training process never returns only costs the worker a fresh block next time: a worker
whose blocks are all out allocates a one-off block, as it would without the pool.

Returns travel through one pipe per worker (:func:`open_returns`), registered in the training process under
a token that the tickets carry. A block that came back once is mapped in the training process for good
(:func:`return_block` keeps it): the worker then sends its ticket alone (``BlockTicket.mapped``) and the training
process finds the block by it (:func:`mapped_block`), instead of passing the block's file descriptor again
(a socket connection with an authentication handshake per subject: about 0.4 ms of CPU in the training process,
measured, and the serving side of it in the worker's resource-sharer thread).
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from typing import NamedTuple

import torch

__all__ = [
    "BlockTicket",
    "SharedBlocks",
    "aligned",
    "block_nbytes",
    "block_view",
    "close_returns",
    "mapped_block",
    "open_returns",
    "return_block",
]

_MIB = 2**20
_ALIGNMENT = 64  # bytes: every tensor laid out in a block starts on a cache line
_tokens = itertools.count()
_returns: dict[int, list] = {}  # in the training process: token -> one return pipe per worker
_mapped: dict[tuple, torch.Tensor] = {}  # in the training process: ticket key -> a block received, kept mapped
_lock = threading.RLock()  # reentrant: a collected pack returns its block from wherever collection runs


class BlockTicket(NamedTuple):
    """Which worker's block a pack was written into, and under which set of return pipes.

    ``mapped``: the block came back to the worker before, so the training process holds it mapped and the
    pack travels without it (see :func:`mapped_block`).
    """

    token: int
    worker: int
    block: int
    mapped: bool = False

    @property
    def key(self) -> tuple[int, int, int]:
        """The block's identity, whether or not it is mapped in the training process yet."""
        return self.token, self.worker, self.block


def open_returns(num_workers: int) -> tuple[int, list]:
    """Create one return pipe per worker, registered under a new token; returns ``(token, pipes)``."""
    token = next(_tokens)
    _returns[token] = [multiprocessing.SimpleQueue() for _ in range(num_workers)]
    return token, _returns[token]


def close_returns(token: int) -> None:
    """Forget the pipes of ``token`` and unmap its blocks: blocks returned later are dropped (their workers are
    gone)."""
    with _lock:
        _returns.pop(token, None)
        for key in [key for key in _mapped if key[0] == token]:
            del _mapped[key]


def return_block(ticket: BlockTicket, block: torch.Tensor) -> None:
    """Hand a worker's block back to it (in the training process); a no-op once its pipes are closed.

    The block stays mapped here, so that receiving it again reuses the mapping (torch looks received shared
    memory up by its file before mapping it) instead of mapping and faulting in its pages anew.
    """
    with _lock:  # the queue's receiver thread returns blocks while the training thread may close the pipes
        pipes = _returns.get(ticket.token)
        if pipes is not None:
            _mapped[ticket.key] = block
            pipes[ticket.worker].put(ticket.block)


def mapped_block(ticket: BlockTicket) -> torch.Tensor:
    """Return the block that ``ticket`` names, mapped in this (the training) process when it was last returned.

    Raises:
        RuntimeError: the block is not mapped here (its return pipes were closed: the queue's workers are
            being shut down).
    """
    with _lock:
        block = _mapped.get(ticket.key)
    if block is None:
        raise RuntimeError(
            f"block {ticket.block} of worker {ticket.worker} is not mapped in this process; its queue's workers "
            "were shut down"
        )
    return block


class SharedBlocks:
    """A worker's pool of at most ``capacity`` shared-memory blocks, handed out for packs and returned through
    ``returned`` (a pipe filled by :func:`return_block` in the training process). A block that came back at
    least once is :meth:`mapped_there`: the training process keeps it mapped.

    Example:
        >>> import multiprocessing
        >>> pipe = multiprocessing.SimpleQueue()
        >>> blocks = SharedBlocks(pipe, capacity=2)
        >>> first, index = blocks.take(1000)
        >>> first.is_shared(), index
        (True, 0)
        >>> blocks.take(1000)[1]  # block 0 is out: a second block
        1
        >>> blocks.take(1000)[1] is None  # both out: a one-off block
        True
        >>> blocks.mapped_there(0)
        False
        >>> pipe.put(0)
        >>> blocks.take(1000)[0].data_ptr() == first.data_ptr()  # block 0 came back: reused
        True
        >>> blocks.mapped_there(0)
        True
    """

    def __init__(self, returned, capacity: int) -> None:
        self.returned = returned
        self.capacity = capacity
        self._blocks: list[torch.Tensor] = []
        self._free: set[int] = set()
        self._came_back: set[int] = set()  # blocks returned at least once since they were made

    def take(self, nbytes: int) -> tuple[torch.Tensor, int | None]:
        """Return a shared block (bytes: a 1-D uint8 tensor) of at least ``nbytes`` and its index (None for a
        one-off block)."""
        while not self.returned.empty():
            index = self.returned.get()
            self._free.add(index)
            self._came_back.add(index)
        fitting = [index for index in self._free if self._blocks[index].numel() >= nbytes]
        if fitting:
            index = min(fitting, key=lambda i: self._blocks[i].numel())
        elif len(self._blocks) < self.capacity:
            index = len(self._blocks)
            self._blocks.append(_new_block(nbytes))
        elif self._free:  # only smaller blocks are free: replace the largest of them
            index = max(self._free, key=lambda i: self._blocks[i].numel())
            self._blocks[index] = _new_block(nbytes)
            self._came_back.discard(index)  # a new block: the training process has not seen it
        else:
            return _new_block(nbytes), None
        self._free.discard(index)
        return self._blocks[index], index

    def mapped_there(self, index: int) -> bool:
        """Return whether block ``index`` came back from the training process, which keeps it mapped."""
        return index in self._came_back

    def give_back(self, index: int | None) -> None:
        """Return block ``index`` (from :meth:`take`, unused after all) to the pool; None (a one-off) is dropped."""
        if index is not None:
            self._free.add(index)


def aligned(nbytes: int, unit: int = _ALIGNMENT) -> int:
    """Round ``nbytes`` up to a multiple of ``unit`` (by default the alignment of the tensors in a block).

    Example:
        >>> aligned(1), aligned(64), aligned(65), aligned(3, unit=2)
        (64, 64, 128, 4)
    """
    return -(-nbytes // unit) * unit


def block_view(block: torch.Tensor, dtype: torch.dtype, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Return the tensor of ``dtype`` and ``shape`` that starts ``offset`` bytes into the bytes of ``block``.

    Example:
        >>> block = torch.zeros(128, dtype=torch.uint8)
        >>> block_view(block, torch.float32, 64, (2, 3)).fill_(1.0).untyped_storage().data_ptr() == block.data_ptr()
        True
        >>> int(block[64:88].count_nonzero())  # six float32 ones: 24 bytes, two of them nonzero per float
        12
    """
    return torch.empty(0, dtype=dtype).set_(block.untyped_storage(), offset // dtype.itemsize, shape)


def block_nbytes(nbytes: int) -> int:
    """Return the size of the block a worker makes for a pack of ``nbytes``: whole MiB, so that slightly larger
    packs still fit.

    Example:
        >>> block_nbytes(1), block_nbytes(2**20 + 1) // 2**20
        (1048576, 2)
    """
    return aligned(max(nbytes, 1), unit=_MIB)


def _new_block(nbytes: int) -> torch.Tensor:
    size = block_nbytes(nbytes)
    try:
        storage = torch.UntypedStorage._new_shared(size)
    except RuntimeError as error:
        raise RuntimeError(
            f"could not allocate a {size // _MIB} MiB shared-memory block for a subject's patches ({error}). "
            "Each of the queue's workers keeps up to a few such blocks (get_max_memory() counts them): raise the "
            "shared-memory limit (/dev/shm; Docker: --shm-size), or use fewer workers, fewer samples_per_volume "
            "or smaller patches"
        ) from error
    return torch.empty(0, dtype=torch.uint8).set_(storage)
