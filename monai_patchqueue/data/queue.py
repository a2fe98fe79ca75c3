"""PatchQueueDataset: shuffled patches from many subjects, prepared in the background, for a plain DataLoader."""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import collate_meta_tensor_fn
from torch.utils.data import IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

from .._checks import check_bool, check_non_negative_int, check_positive_int, check_seed
from .background import BackgroundTasks, memory_outside_buffer, patches_in_slabs, subjects_in_flight
from .block_pins import BlockPins, kept_pinned_blocks, pinned_blocks_per_worker
from .planner import EpochPlanner
from .receiver import ReceiverStopped
from .schedule import SubjectTask
from .served_collate import register_served_collation
from .serving import EpochServer
from .slabs import ServedPatch
from .subject_patches import SubjectError, SubjectPatches, patch_nbytes, subject_counts

__all__ = ["EpochStatistics", "PatchQueueDataset"]

logger = logging.getLogger(__name__)


@dataclass
class EpochStatistics:
    """What the last epoch cost: patches served, seconds waiting for background work, seconds in total."""

    epoch: int = -1
    patches: int = 0
    wait_s: float = 0.0
    elapsed_s: float = 0.0


class PatchQueueDataset(IterableDataset):
    """Serve shuffled patches from many subjects, loaded, transformed and sampled in background workers.

    Each epoch visits every subject (of this rank) once: ``num_workers`` processes load it from ``data``,
    apply ``transform``, cut ``samples_per_volume`` patches with ``sampler`` (a subject's ``num_samples``
    entry overrides the count) and apply ``patch_transform`` to each; only the patches return to this
    process. They enter a buffer of at most ``max_length`` patches, from which patches are popped at random
    (``shuffle_patches``) so that a batch mixes subjects. A subject enters the buffer as soon as there is room
    for all its patches, so the buffer is topped up while patches are consumed, and the workers keep
    preparing the next subjects, into the next epoch, while the training loop runs.

    The stream is reproducible: with ``seed`` (or :meth:`set_random_state`), which subject, which location and
    which order depend only on the seed and the epoch, not on ``num_workers``. Each epoch draws afresh; the
    epoch advances at every iteration and :meth:`set_epoch` positions it. Random transforms must draw from
    their own ``R`` (all MONAI transforms do), which the queue seeds per subject. With workers the queue serves one
    iteration at a time: an iterator overtaken by a newer one raises a RuntimeError that says so.

    Under DDP (``torch.distributed`` initialised, or a ``DistributedSampler`` as ``subject_sampler``) each
    rank takes a disjoint share of the subjects and every rank yields the same number of patches.

    Iterate it with ``DataLoader(queue, batch_size=B)`` and ``num_workers=0`` (the queue has its own workers;
    a DataLoader worker raises at the first iteration rather than duplicate patches), or better with MONAI's
    ``ThreadDataLoader(queue, batch_size=B, buffer_size=2)``, which collates the next batches in a thread while
    the training step runs instead of between steps (with workers, a thread of the queue already receives and
    unpacks their patches ahead). MONAI's ``ThreadDataLoader`` does not pass an error of its thread on: a
    failing subject ends that epoch early (the error printed), and the queue raises it at the next iteration
    instead, or at :meth:`close` (and the end of a ``with`` block) when none follows; with torch's
    ``DataLoader`` it is raised in the loop at once. Creating a queue
    registers MONAI's MetaTensor collation with torch's ``default_collate`` (:func:`collate_metadata_per_item`),
    so that torch's DataLoader, like MONAI's, keeps one affine per patch in a batch.

    Read through torch's ``default_collate`` (torch's DataLoader), the patches are served in slabs of up to 16
    (:mod:`~monai_patchqueue.data.slabs`): they are copied, in serving order, into one tensor per entry with
    their metadata collated, so that a batch is a slice (a view) of its slab instead of a stack of its tensors
    and header fields built on the training thread; with workers the slabs are laid out in the queue's thread. A
    batch therefore shares memory with its patches and keeps its slab alive (``.clone()`` a batch or patch to
    keep it on its own); a patch changed after it was served is collated the usual way. MONAI's loaders collate
    key by key (``list_data_collate``), which would copy the slab's rows again: when the queue sees that batches
    are not collated from its slabs, it serves the patches as they are.

    With workers, patches arrive as views of the shared-memory block their worker wrote them into, rather than
    copies (:mod:`~monai_patchqueue.data.block_pins`); the block goes back to its worker once every view of it
    is gone, typically once its patches are collated. A patch kept past its step keeps its subject's block (the
    queue pins a few blocks per worker at most and copies patches out beyond that); ``.clone()`` it to keep it
    on its own. The metadata values a subject's patches hold in common (the file header) cross once per subject
    and are then shared by those patches' meta dicts: read them, or replace them (``meta[key] = ...``), rather
    than changing them in place. (``patch_transform`` runs in the worker on each patch's own copy.)

    Args:
        data: subject dicts: a MONAI datalist or a map-style dataset returning dicts (e.g. ``CacheDataset``).
        sampler: transform that returns a list of patch dicts from a subject dict: ``UniformSamplerd``,
            ``WeightedSamplerd``, ``LabelSamplerd`` or MONAI's ``RandSpatialCropSamplesd``,
            ``RandWeightedCropd``, ``RandCropByLabelClassesd``, ``RandCropByPosNegLabeld``. Entries it does not
            crop are left out of the patches (list every array you need in its ``keys``).
        max_length: most patches held in the buffer (besides, two slabs of up to 16 patches are served from and
            filled, and with workers up to ``2 * num_workers + 1`` subjects' patches are in flight, see
            :attr:`max_patches_held`; :meth:`get_max_memory` counts them and the workers' shared memory).
        samples_per_volume: patches per subject and epoch, whatever the sampler's ``num_samples``.
        transform: applied to each subject dict before sampling (loading, preprocessing, augmentation).
        patch_transform: applied to each patch dict after sampling.
        num_workers: background processes; 0 prepares subjects in the calling process when needed.
        shuffle_subjects: visit subjects in a new order each epoch.
        shuffle_patches: pop patches at random from the buffer; False serves them subject by subject.
        subject_sampler: iterable of subject indices with optional ``set_epoch`` (e.g. ``DistributedSampler``).
        start_background: start the workers on the first epoch now rather than at the first iteration.
        seed: seed of the whole stream; None draws one from the operating system.
        verbose: log fills and timings at INFO level (logger ``monai_patchqueue.data.queue``).

    Raises:
        ValueError: ``max_length`` smaller than a subject's patch count, non-positive sizes.
        SubjectError: during iteration, when a subject fails; the message names the subject and its files.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from monai_patchqueue import PatchQueueDataset, UniformSamplerd
        >>> data = [{"image": torch.rand(1, 8, 8, 8), "id": i} for i in range(3)]
        >>> queue = PatchQueueDataset(data, UniformSamplerd("image", 4), max_length=6, samples_per_volume=2, seed=0)
        >>> len(queue)
        6
        >>> batch = next(iter(DataLoader(queue, batch_size=4)))
        >>> tuple(batch["image"].shape), tuple(batch["location"].shape)
        ((4, 1, 4, 4, 4), (4, 6))
        >>> queue.close()
    """

    def __init__(
        self,
        data: Sequence[Mapping] | torch.utils.data.Dataset,
        sampler: Callable,
        max_length: int,
        samples_per_volume: int,
        *,
        transform: Callable | None = None,
        patch_transform: Callable | None = None,
        num_workers: int = 0,
        shuffle_subjects: bool = True,
        shuffle_patches: bool = True,
        subject_sampler: Iterable[int] | None = None,
        start_background: bool = True,
        seed: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.max_length = check_positive_int(max_length, "max_length")
        self.samples_per_volume = check_positive_int(samples_per_volume, "samples_per_volume")
        self.num_workers = check_non_negative_int(num_workers, "num_workers")
        self.shuffle_subjects = check_bool(shuffle_subjects, "shuffle_subjects")
        self.shuffle_patches = check_bool(shuffle_patches, "shuffle_patches")
        self.verbose = check_bool(verbose, "verbose")
        for name, value in (("sampler", sampler), ("transform", transform), ("patch_transform", patch_transform)):
            if value is not None and not callable(value):
                raise TypeError(f"`{name}` should be a callable transform, but got {name}={value!r:.100}")
        if sampler is None:
            raise TypeError("`sampler` should be a transform returning a list of patch dicts, but got sampler=None")
        collate_metadata_per_item()
        register_served_collation()
        self.data = data
        self.counts = subject_counts(data, self.samples_per_volume, self.max_length)
        self.subject_sampler = subject_sampler
        self._explicit_seed = seed is not None
        self.seed = check_seed(seed)
        self.statistics = EpochStatistics()
        self._work = SubjectPatches(
            data, copy.deepcopy(sampler), copy.deepcopy(transform), copy.deepcopy(patch_transform)
        )
        self._planner = EpochPlanner(self.counts, self.seed, self.shuffle_subjects, subject_sampler)
        self._epoch = 0
        self._unreported_failure: Exception | None = None
        self._background: BackgroundTasks | None = None
        self._server: EpochServer | None = None
        if check_bool(start_background, "start_background"):
            self._start(self._epoch)

    # --- the epoch -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Patches in the current epoch of this rank."""
        return sum(task.count for task in self._planner.tasks(self._epoch))

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration serve epoch ``epoch`` (and pass it to ``subject_sampler``)."""
        self._epoch = check_non_negative_int(epoch, "epoch")

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Reseed the whole stream from ``seed`` (or a seed drawn from ``state``); returns ``self``.

        MONAI's ``DataLoader`` and ``ThreadDataLoader`` (with ``num_workers=0``) reseed their dataset from
        torch's global generator when they are built. A queue built with an explicit ``seed`` keeps it then, so
        its stream stays reproducible with any loader; a queue built with ``seed=None`` takes MONAI's seed, so
        ``monai.utils.set_determinism`` makes it reproducible.

        Workers that were running start again at once, here, for the new stream, rather than at the next
        iteration: MONAI's ``ThreadDataLoader`` iterates in a thread of its own, and a worker forked from a
        thread other than the main one allocates from that thread's glibc arena, whose heaps hold at most
        64 MiB, so that every larger allocation (a 4-channel volume, say) was mapped afresh and faulted in for
        every subject, however :func:`~monai_patchqueue.keep_freed_memory` was set.
        """
        if self._explicit_seed and _called_by_monai_loader():
            return self
        if state is not None:
            seed = int(state.randint(np.iinfo(np.int32).max))
        self.seed = check_seed(seed)
        self._planner = EpochPlanner(self.counts, self.seed, self.shuffle_subjects, self.subject_sampler)
        restart = self._background is not None
        self._stop_background()
        if restart:
            self._start(self._epoch)
        return self

    def __iter__(self) -> Iterator[dict]:
        """Return the iterator of the next epoch's patches; first raise a failure that an earlier epoch met in
        a thread that did not pass it on to the training loop (see :meth:`_epoch_patches`)."""
        self._raise_unreported_failure()
        return self._epoch_patches(threading.current_thread())

    def _epoch_patches(self, consumer: threading.Thread) -> Iterator[dict]:
        """Serve the next epoch. A failure raised in a thread other than ``consumer`` (the one that asked for the
        iterator) is also kept for the next :meth:`__iter__`: MONAI's ``ThreadDataLoader`` fetches in a thread
        that dies of it, printing it, and ends the epoch early as if it were complete. An iteration stopped by
        the caller (``close``, a reseed, a newer iteration) is no failure to report."""
        _refuse_outer_workers(self.num_workers)
        epoch = self._epoch
        self._epoch += 1
        background = self._start(epoch)
        try:
            yield from self._serve(epoch, background.slabs(epoch))
        except Exception as error:
            if threading.current_thread() is not consumer and not isinstance(error, ReceiverStopped):
                self._unreported_failure = _unreported(error, epoch, threading.current_thread().name)
            raise
        background.finished(epoch)

    def _serve(self, epoch: int, slabs: Iterator[list[ServedPatch]]) -> Iterator[ServedPatch]:
        stats = EpochStatistics(epoch=epoch)
        start = time.perf_counter()
        while True:
            waited = time.perf_counter()
            slab = next(slabs, None)
            stats.wait_s += time.perf_counter() - waited
            if slab is None:
                break
            self._server.probe.took(len(slab))
            for patch in slab:
                stats.patches += 1
                yield patch
        stats.elapsed_s = time.perf_counter() - start
        self.statistics = stats
        pins = self._server.pins
        self._log(
            "epoch %d: %d patches in %.2f s, %.2f s waiting for workers%s",
            epoch,
            stats.patches,
            stats.elapsed_s,
            stats.wait_s,
            "" if pins is None else f"; so far {pins.summary()}",
        )

    # --- background work -------------------------------------------------------------------------------------

    def _start(self, epoch: int) -> BackgroundTasks:
        if self._background is None:
            pins = self._block_pins()
            self._server = EpochServer(
                self.data, self._planner, self.seed, self.max_length, self.shuffle_patches, self.verbose, pins
            )
            self._background = BackgroundTasks(self._work, self._planner, self.num_workers, self._server, pins)
            if self.num_workers:
                self._background.start(epoch)
        return self._background

    def _block_pins(self) -> BlockPins | None:
        """The budget of workers' blocks whose patches are served as views (see :mod:`.block_pins`)."""
        if not self.num_workers:
            return None
        subject_count = max(self.counts)
        per_worker = pinned_blocks_per_worker(self.max_length, subject_count, self.num_workers)
        return BlockPins(per_worker, kept=kept_pinned_blocks(self.max_length, subject_count))

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live background workers."""
        return [] if self._background is None else self._background.worker_pids

    def close(self) -> None:
        """Stop the background workers; a later iteration starts them again.

        Raises:
            SubjectError: (or RuntimeError) a failure that ended the last epoch in a loader's thread which did
                not pass it on (MONAI's ``ThreadDataLoader``) and that no later iteration raised; the workers are
                stopped first.
        """
        self._stop_background()
        self._raise_unreported_failure()

    def _raise_unreported_failure(self) -> None:
        """Raise (once) the failure :meth:`_epoch_patches` kept for the training loop, if any."""
        failure, self._unreported_failure = self._unreported_failure, None
        if failure is not None:
            raise failure

    def _stop_background(self) -> None:
        if self._background is not None:
            self._background.close()
            self._background = None

    def __enter__(self) -> PatchQueueDataset:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.close()
        else:  # the block's own error goes on; an unreported failure of the queue would only hide it
            self._stop_background()

    def __del__(self) -> None:
        background = getattr(self, "_background", None)
        if background is not None:
            background.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_background"] = state["_server"] = state["_unreported_failure"] = None
        return state

    # --- memory and reporting --------------------------------------------------------------------------------

    @property
    def max_patches_held(self) -> int:
        """Most patches held at once: the buffer, the slab being served and the one filled ahead, and with
        workers the subjects in flight (prefetched by the workers, and the one being unpacked in this process)."""
        return (
            self.max_length
            + patches_in_slabs(self.max_length)
            + subjects_in_flight(self.num_workers) * max(self.counts)
        )

    def get_max_memory(self, subject: Mapping | None = None) -> int:
        """Return the most bytes the queue's patches can occupy, from one real patch: the buffer's
        ``max_length`` patches, the two slabs outside it and, with workers, the subject being unpacked in this
        process and the workers' shared memory (per worker, the blocks in flight and those this process may hold
        pinned, each one subject's patches rounded up to whole MiB). Batches the training loop still holds come
        on top.

        Args:
            subject: a prepared subject dict to cut the patch from; None loads and transforms the first subject.
        """
        if subject is None:
            work = SubjectPatches(self.data, copy.deepcopy(self._work.sampler), copy.deepcopy(self._work.transform))
        else:
            work = SubjectPatches([subject], copy.deepcopy(self._work.sampler))
        _, patches = work[SubjectTask(epoch=0, position=0, subject=0, count=1, seed=0)]
        subject_count = max(self.counts)
        return patch_nbytes(patches[0]) * self.max_length + memory_outside_buffer(
            self.num_workers, patches[0], subject_count, self.max_length
        )

    def get_max_memory_pretty(self, subject: Mapping | None = None) -> str:
        """Return :meth:`get_max_memory` in binary units, e.g. ``'1.50 GiB'``."""
        return _pretty_bytes(self.get_max_memory(subject))

    def _log(self, message: str, *args: Any) -> None:
        if self.verbose:
            logger.info(message, *args)

    def __repr__(self) -> str:
        running = self._background is not None and (self.num_workers == 0 or bool(self.worker_pids))
        return (
            f"{type(self).__name__}(subjects={len(self.counts)}, samples_per_volume={self.samples_per_volume}, "
            f"max_length={self.max_length}, num_workers={self.num_workers}, epoch={self._epoch}, "
            f"patches_per_epoch={len(self)}, buffered={0 if self._server is None else self._server.buffered}, "
            f"background={'running' if running else 'stopped'}, seed={self.seed})"
        )


def collate_metadata_per_item() -> None:
    """Make ``torch.utils.data.default_collate`` batch MetaTensor metadata as MONAI's collation does.

    Without this, torch's default collation stacks MetaTensors but keeps the first patch's affine for the
    whole batch; with it, a batch carries one affine (and trace) per patch, as with ``monai.data.DataLoader``.
    Registered (once, for MetaTensor only) when a queue is created.
    """
    default_collate_fn_map.setdefault(MetaTensor, collate_meta_tensor_fn)


def _pretty_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"  # pragma: no cover


def _called_by_monai_loader() -> bool:
    """Whether ``set_random_state`` was called by MONAI's loaders seeding their dataset (``set_rnd``)."""
    caller = sys._getframe(2)
    return caller.f_code.co_name == "set_rnd" and caller.f_globals.get("__name__") == "monai.data.utils"


def _unreported(error: Exception, epoch: int, thread: str) -> Exception:
    """The error that the next iteration raises for ``error``, met in epoch ``epoch`` by thread ``thread``."""
    kind = SubjectError if isinstance(error, SubjectError) else RuntimeError
    unreported = kind(
        f"epoch {epoch} stopped early at a failure raised in thread {thread!r}, which did not pass it on to the "
        f"training loop (MONAI's ThreadDataLoader does not; torch's DataLoader does): {error}"
    )
    unreported.__cause__ = error
    return unreported


def _refuse_outer_workers(num_workers: int) -> None:
    info = get_worker_info()
    if info is not None:
        raise RuntimeError(
            f"PatchQueueDataset was iterated in DataLoader worker {info.id} of {info.num_workers}: each worker would "
            "serve its own copy of every patch. Use DataLoader(queue, batch_size=..., num_workers=0) and set the "
            f"queue's own `num_workers` (now {num_workers}) to prepare subjects in the background."
        )
