"""The work of one background task: load a subject, transform it, cut its patches, transform each patch.

:class:`SubjectPatches` is a map-style dataset indexed by :class:`~monai_patchqueue.data.schedule.SubjectTask`;
the queue runs it in worker processes through a ``torch.utils.data.DataLoader`` (or in the calling process).
Only patches leave it: arrays the sampler did not crop are dropped, and views into the volume are copied.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._checks import check_positive_int
from ..transforms.dictionary import is_patch_sampler
from ..transforms.patch_memory import PatchMemoryLender, patch_metadata_shared, patches_written_to
from .schedule import SubjectTask

__all__ = [
    "SubjectError",
    "SubjectPatches",
    "describe_subject",
    "patch_nbytes",
    "raw_entries",
    "set_sample_count",
    "subject_counts",
]


NUM_SAMPLES = "num_samples"
"""Entry of a subject dict that overrides the queue's ``samples_per_volume`` for that subject."""


class SubjectError(RuntimeError):
    """A subject could not be loaded, transformed or sampled; the message names the subject.

    Raised in the training loop by :class:`PatchQueueDataset`, whichever process prepared the subject; the
    original exception is its ``__cause__`` when it was raised in this process.

    Example:
        >>> from monai.transforms import LoadImaged
        >>> from monai_patchqueue import PatchQueueDataset, SubjectError, UniformSamplerd
        >>> data = [{"image": "/missing/scan.nii.gz"}]
        >>> try:
        ...     with PatchQueueDataset(data, UniformSamplerd("image", 4), 2, 2, transform=LoadImaged("image")) as queue:
        ...         next(iter(queue))
        ... except SubjectError as error:
        ...     print(error)
        PatchQueueDataset could not prepare subject 0 {'image': '/missing/scan.nii.gz'}: FileNotFoundError: ...
    """


def raw_entries(data: Any) -> Sequence[Mapping] | None:
    """Return the datalist behind ``data`` (a list of dicts, or a MONAI ``Dataset``'s ``.data``), if any.

    Example:
        >>> raw_entries([{"image": "a.nii"}])
        [{'image': 'a.nii'}]
        >>> raw_entries(range(3)) is None
        True
    """
    for candidate in (data, getattr(data, "data", None)):
        if isinstance(candidate, Sequence) and not isinstance(candidate, (str, bytes)):
            if all(isinstance(entry, Mapping) for entry in candidate):
                return candidate
    return None


def describe_subject(data: Any, index: int) -> str:
    """Return ``"subject <index>"`` followed by the subject's file names or entries, for error messages.

    Example:
        >>> describe_subject([{"image": "/data/a.nii.gz", "age": 3}], 0)
        "subject 0 {'image': '/data/a.nii.gz'}"
        >>> describe_subject([{"image": torch.zeros(2), "id": 7}], 0)
        "subject 0 {'id': 7}"
    """
    entries = raw_entries(data)
    if entries is None or not 0 <= index < len(entries):
        return f"subject {index}"
    entry = entries[index]
    files = {key: os.fspath(value) for key, value in entry.items() if isinstance(value, (str, os.PathLike))}
    if files:
        return f"subject {index} {files}"
    scalars = {key: value for key, value in entry.items() if isinstance(value, (int, float))}
    return f"subject {index} {scalars or sorted(map(str, entry))}"


def set_sample_count(sampler: Any, count: int) -> None:
    """Ask ``sampler`` for ``count`` patches per call where it exposes a ``num_samples`` (ours and MONAI's).

    The queue still calls the sampler until it has ``count`` patches and drops any extra, so samplers that
    expose no count are correct, only slower.
    """
    for holder in (sampler, getattr(sampler, "sampler", None), getattr(sampler, "cropper", None)):
        if holder is not None and isinstance(getattr(holder, "num_samples", None), int):
            holder.num_samples = count
            return


def patch_nbytes(patch: Mapping) -> int:
    """Return the bytes held by the tensors and arrays of one patch dict.

    Example:
        >>> patch_nbytes({"image": torch.zeros(1, 4, 4, 4), "name": "a"})
        256
    """
    return sum(
        value.numel() * value.element_size() if isinstance(value, torch.Tensor) else value.nbytes
        for value in patch.values()
        if isinstance(value, (torch.Tensor, np.ndarray))
    )


def _seed(component: Any, seed: int) -> None:
    if component is not None and hasattr(component, "set_random_state"):
        component.set_random_state(seed=seed)


def _owned(value: Any) -> Any:
    """Return ``value`` with its own compact storage, so a patch never keeps its volume alive."""
    if isinstance(value, torch.Tensor):
        if value.untyped_storage().nbytes() > value.numel() * value.element_size() or not value.is_contiguous():
            return value.clone(memory_format=torch.contiguous_format)
        return value
    if isinstance(value, np.ndarray) and value.base is not None:
        return value.copy()
    return value


class SubjectPatches(torch.utils.data.Dataset):
    """Turn a :class:`SubjectTask` into that subject's list of patch dicts.

    Args:
        data: sequence or map-style dataset of subject dicts.
        sampler: transform returning a list of patch dicts (or one dict) from a subject dict.
        transform: applied to the subject dict before sampling; None for none.
        patch_transform: applied to every patch dict; None for none.

    Raises:
        SubjectError: anything raised while preparing the subject, re-raised with the subject's description.

    Example:
        >>> from monai_patchqueue import UniformSamplerd
        >>> from monai_patchqueue.data.schedule import SubjectTask
        >>> work = SubjectPatches([{"image": torch.zeros(1, 8, 8, 8)}], UniformSamplerd("image", 4))
        >>> task, patches = work[SubjectTask(epoch=0, position=0, subject=0, count=3, seed=7)]
        >>> len(patches), tuple(patches[0]["image"].shape)
        (3, (1, 4, 4, 4))
    """

    def __init__(
        self,
        data: Any,
        sampler: Callable,
        transform: Callable | None = None,
        patch_transform: Callable | None = None,
    ) -> None:
        self.data = data
        self.sampler = sampler
        self.transform = transform
        self.patch_transform = patch_transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, task: SubjectTask) -> tuple[SubjectTask, list[dict]]:
        return self.prepare(task)

    def prepare(
        self, task: SubjectTask, lender: PatchMemoryLender | None = None, packed: bool = False
    ) -> tuple[SubjectTask, list[dict]]:
        """Return ``(task, patches)``; with a ``lender``, the samplers cut the patches into its memory (see
        :mod:`monai_patchqueue.transforms.patch_memory`). ``packed`` says that the caller packs the patches at
        once (:class:`~.transport.PatchPack`), which shares the values they hold in common: when the sampler is
        one of the package's own and no ``patch_transform`` runs (either could change a patch's metadata in
        place), the sampler then gives the patches one copy of the subject's metadata values instead of one
        each."""
        try:
            return task, self._patches(task, lender, packed)
        except Exception as error:
            cause = f"{type(error).__name__}: {error}"
            raise SubjectError(
                f"PatchQueueDataset could not prepare {describe_subject(self.data, task.subject)}: {cause}"
            ) from error

    def _patches(self, task: SubjectTask, lender: PatchMemoryLender | None, packed: bool) -> list[dict]:
        transform_seed, sampler_seed, patch_seed = np.random.SeedSequence(task.seed).generate_state(3)
        subject = self.data[task.subject]
        if self.transform is not None:
            _seed(self.transform, int(transform_seed))
            subject = self.transform(subject)
        if not isinstance(subject, Mapping):
            raise TypeError(
                f"a subject should be a dict after `transform`, but got {type(subject).__name__}; "
                "put patch samplers in `sampler`, not in `transform`"
            )
        _seed(self.sampler, int(sampler_seed))
        share = packed and self.patch_transform is None and is_patch_sampler(self.sampler)
        with patches_written_to(lender), patch_metadata_shared(share):
            patches = [self._only_patches(patch, subject, lender) for patch in self._sample(subject, task.count)]
        if self.patch_transform is not None:
            _seed(self.patch_transform, int(patch_seed))
            patches = [self.patch_transform(patch) for patch in patches]
        return patches

    def _sample(self, subject: Mapping, count: int) -> list[Mapping]:
        set_sample_count(self.sampler, count)
        patches: list[Mapping] = []
        while len(patches) < count:
            drawn = self.sampler(subject)
            drawn = [drawn] if isinstance(drawn, Mapping) else list(drawn)
            if not drawn or not all(isinstance(patch, Mapping) for patch in drawn):
                raise TypeError(f"`sampler` should return a non-empty list of dicts, but got {drawn!r:.200}")
            patches.extend(drawn)
        return patches[:count]

    @staticmethod
    def _only_patches(patch: Mapping, subject: Mapping, lender: PatchMemoryLender | None) -> dict:
        """Drop arrays the sampler passed through uncropped, and the queue's own ``num_samples`` entry; give
        every cropped array its own storage (or leave it in the lender's memory)."""
        out = {}
        for key, value in patch.items():
            if key == NUM_SAMPLES or (isinstance(value, (torch.Tensor, np.ndarray)) and subject.get(key) is value):
                continue
            lent = lender is not None and isinstance(value, torch.Tensor) and lender.holds(value)
            out[key] = value if lent else _owned(value)
        return out


def subject_counts(data: Any, samples_per_volume: int, max_length: int) -> list[int]:
    """Return each subject's patch count: its ``num_samples`` entry or ``samples_per_volume``.

    Raises:
        TypeError: ``data`` has no length, or a ``num_samples`` entry is not an integer (naming the subject).
        ValueError: ``data`` is empty, or a count is not positive or exceeds ``max_length``.

    Example:
        >>> subject_counts([{"image": "a.nii"}, {"image": "b.nii", "num_samples": 2}], 4, max_length=8)
        [4, 2]
    """
    if samples_per_volume > max_length:
        raise ValueError(
            f"`max_length` should be at least `samples_per_volume`, but got max_length={max_length} "
            f"and samples_per_volume={samples_per_volume}"
        )
    try:
        num_subjects = len(data)
    except TypeError:
        raise TypeError(
            f"`data` should be a sequence or a map-style dataset with a length, but got {type(data).__name__}"
        ) from None
    if num_subjects == 0:
        raise ValueError("`data` should hold at least one subject, but it is empty")
    entries = raw_entries(data)
    if entries is None:
        return [samples_per_volume] * num_subjects
    counts = []
    for index, entry in enumerate(entries):
        count = entry.get(NUM_SAMPLES, samples_per_volume)
        try:
            count = check_positive_int(count, NUM_SAMPLES)
        except (TypeError, ValueError) as error:  # describe the subject (a scan of the datalist) only when raising
            raise type(error)(f"{describe_subject(data, index)}: {error}") from None
        if count > max_length:
            raise ValueError(f"{describe_subject(data, index)} asks for num_samples={count} > max_length={max_length}")
        counts.append(count)
    return counts
