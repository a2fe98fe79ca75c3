"""Start the queue's worker processes so that their memory costs neither page faults nor garbage collection.

Allocator: keep a worker's freed memory for reuse instead of handing it back to the system after every subject.

A worker cuts each subject's patches into fresh tensors (about 20 MiB for sixteen 64^3 image and label patches),
packs them, and frees them; glibc then returns the freed top of its heap to the system (anything above its
2 MiB trim threshold), so the next subject's patches fault in every page again: measured on the benchmark
machine, a third of a worker's CPU time per patch. :func:`keep_freed_memory` raises glibc's trim threshold
and has it serve every allocation from its heap, none from a mapping of its own, in the worker processes the
queue owns, so that memory freed after one subject serves the next. A worker then holds on to the memory its
largest subject needed anyway (freed memory up to ``TRIM_THRESHOLD_BYTES`` at the top of its heap, and what
lies freed between allocations still in use). glibc's own rule gives every allocation from 32 MiB on (its
largest mmap threshold) a mapping that is returned on free, so such allocations, a large volume or a batch of
multi-channel patches, came back as fresh pages every time. On other C libraries (musl, macOS) nothing
changes.

The queue leaves the training process's allocator alone. A training script may call :func:`keep_freed_memory`
itself, once, at its start: collating each batch then reuses freed memory instead of faulting in fresh pages
(about 15% of the training process's CPU per patch on the benchmark; for batches of 8 four-channel 64^3
float32 patches, 32 MiB each, stacking a batch took 3.5 instead of 19.5 ms of CPU), at the price of keeping up
to ``TRIM_THRESHOLD_BYTES`` of freed memory for reuse.

Garbage collector: a forked worker inherits every object of the training process (some 400,000 with torch and
MONAI imported). A full collection, which a worker's allocations trigger within its first few dozen subjects,
walked all of them (about 0.26 s on the benchmark machine) and wrote to each one's header, so that every worker
ended up with its own copy of the parent's heap pages: 136-139 MiB of private memory per worker in the queue
benchmark, against 37 MiB once frozen. :func:`freeze_inherited_objects` moves the inherited objects to the
collector's permanent generation, which collections skip; those that become cyclic garbage in the worker are
then never collected there (the worker's own objects are, as before).
:func:`start_worker`, the queue's ``worker_init_fn``, does both; the training process is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

__all__ = ["freeze_inherited_objects", "keep_freed_memory", "start_worker"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 512 * 2**20
"""Free memory a worker keeps at the top of its heap (glibc's default is 2 MiB, raised as chunks come and go)."""


@functools.cache
def _mallopt():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def keep_freed_memory(worker_id: int | None = None) -> bool:
    """Have glibc keep this process's freed memory for reuse; return whether it could (False without glibc).

    The queue calls it in each of its workers, through :func:`start_worker` (``worker_id`` is ignored). Call it at the
    start of a training script to have the training process reuse the memory of each collated batch too; see
    the module docstring for what it keeps.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(range(4), num_workers=2, worker_init_fn=keep_freed_memory)
        >>> # and, in a training script, once at its start: keep_freed_memory()
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    trimmed = mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD_BYTES))
    unmapped = mallopt(_M_MMAP_MAX, ctypes.c_int(0))  # no allocation gets a mapping of its own, returned on free
    return bool(trimmed and unmapped)


def freeze_inherited_objects() -> int:
    """Move the objects this process holds now to the garbage collector's permanent generation; return how many.

    Meant for the start of a forked worker: its collections then skip what it inherited (see the module
    docstring).

    Example:
        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(range(4), num_workers=2, worker_init_fn=lambda worker_id: freeze_inherited_objects())
    """
    gc.freeze()
    return gc.get_freeze_count()


def start_worker(worker_id: int | None = None) -> None:
    """Prepare one of the queue's worker processes: :func:`keep_freed_memory` and :func:`freeze_inherited_objects`.

    The queue passes it as its workers' ``worker_init_fn`` (``worker_id`` is ignored).

    Example:
        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(range(4), num_workers=2, worker_init_fn=start_worker)
    """
    keep_freed_memory()
    freeze_inherited_objects()
