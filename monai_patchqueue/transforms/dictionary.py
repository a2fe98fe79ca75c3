"""Dictionary-level patch samplers: each wraps one array sampler and only adds key handling.

Every key is cropped at the same locations; the result is a list of patch dicts (MONAI's multi-sample
convention, flattened by ``Compose`` and ``DataLoader``). Each patch dict carries every non-key entry of the
input by reference, and a top-level ``location`` (int64, starts then exclusive ends) that collates to
``B x 2n``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform, MultiSampleTrait, Randomizable

from .array import GridSampler, LabelSampler, PatchCropper, UniformSampler, WeightedSampler
from .functional import LOCATION, spatial_shape_of

__all__ = ["GridSamplerd", "LabelSamplerd", "UniformSamplerd", "WeightedSamplerd"]


class _PatchSamplerd(MapTransform, InvertibleTransform, MultiSampleTrait):
    """Key handling shared by the dictionary samplers; ``self.sampler`` is the array sampler."""

    sampler: PatchCropper

    def _keys_and_shape(self, data: Mapping) -> tuple[list[Hashable], tuple[int, ...]]:
        keys = list(self.key_iterator(data))
        if not keys:
            raise KeyError(f"none of the keys {list(self.keys)} is in the data; available keys: {list(data)}")
        shapes = {key: spatial_shape_of(data[key], f"key {key!r}") for key in keys}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"keys should share their spatial shape, but got {shapes}")
        return keys, shapes[keys[0]]

    def _patch_dicts(self, data: dict, keys: list[Hashable], crop) -> list[dict]:
        """Return one dict per location: ``data``'s entries, each key replaced by its patch."""
        locations = self.sampler.locations
        patches_per_key = {key: crop(data[key]) for key in keys}
        out = []
        for index, location in enumerate(locations):
            patch = dict(data)
            for key in keys:
                patch[key] = patches_per_key[key][index]
            patch[LOCATION] = torch.as_tensor(location, dtype=torch.int64)
            out.append(patch)
        return out

    def _crop_keys(self, data: dict, keys: list[Hashable]) -> list[dict]:
        return self._patch_dicts(data, keys, lambda img: self.sampler.crop(img, self.sampler.locations))

    def inverse(self, data: Mapping) -> dict:
        """Put every key of one patch dict back in a zero volume of the original shape; drop ``location``."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.sampler.inverse(d[key])
        d.pop(LOCATION, None)
        return d


class _RandomPatchSamplerd(Randomizable, _PatchSamplerd):
    """Forwards ``set_random_state`` to the wrapped array sampler, the one user of randomness."""

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.sampler.set_random_state(seed, state)
        return self

    def randomize(self, data: Mapping) -> None:  # pragma: no cover - each subclass draws in __call__
        raise NotImplementedError


def _required_entry(data: Mapping, key: Hashable, argument: str) -> torch.Tensor:
    if key not in data:
        raise KeyError(f"`{argument}` {key!r} is not in the data; available keys: {list(data)}")
    return data[key]


def _check_matches_keys(entry: torch.Tensor, spatial_shape: Sequence[int], argument: str, key: Hashable) -> None:
    entry_shape = spatial_shape_of(entry, f"`{argument}` {key!r}")
    if entry_shape != tuple(spatial_shape):
        raise ValueError(
            f"`{argument}` {key!r} has spatial shape {entry_shape} but the keys have {tuple(spatial_shape)}"
        )


class UniformSamplerd(_RandomPatchSamplerd):
    """Dictionary version of :class:`~monai_patchqueue.UniformSampler`.

    Args:
        keys: keys to crop, all of the same spatial shape.
        patch_size: an int for every spatial dim, or one int per spatial dim.
        num_samples: how many patch dicts each call returns.
        allow_missing_keys: skip keys that are absent instead of raising KeyError.

    Example:
        >>> data = {"image": torch.zeros(1, 8, 8, 8), "label": torch.ones(1, 8, 8, 8), "id": "subject-1"}
        >>> patches = UniformSamplerd(["image", "label"], 4, num_samples=2).set_random_state(0)(data)
        >>> len(patches), tuple(patches[0]["image"].shape), patches[0]["id"]
        (2, (1, 4, 4, 4), 'subject-1')
        >>> patches[0]["location"]
        tensor([4, 3, 3, 8, 7, 7])
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: int | Sequence[int],
        num_samples: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.sampler = UniformSampler(patch_size, num_samples=num_samples)

    def __call__(self, data: Mapping) -> list[dict]:
        d = dict(data)
        keys, spatial_shape = self._keys_and_shape(d)
        self.sampler.randomize(spatial_shape, where=f"key {keys[0]!r}")
        return self._crop_keys(d, keys)


class WeightedSamplerd(_RandomPatchSamplerd):
    """Dictionary version of :class:`~monai_patchqueue.WeightedSampler`.

    Args:
        keys: keys to crop, all of the same spatial shape.
        patch_size: an int for every spatial dim, or one int per spatial dim.
        probability_key: key of the ``(1, *spatial)`` probability map (it is cropped only if it is in ``keys``).
        num_samples: how many patch dicts each call returns.
        allow_missing_keys: skip keys that are absent instead of raising KeyError.

    Example:
        >>> weights = torch.zeros(1, 8, 8, 8)
        >>> weights[0, 4, 4, 4] = 1.0
        >>> sampler = WeightedSamplerd("image", 2, probability_key="weights")
        >>> sampler({"image": torch.rand(1, 8, 8, 8), "weights": weights})[0]["location"]
        tensor([3, 3, 3, 5, 5, 5])
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: int | Sequence[int],
        probability_key: str,
        num_samples: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.probability_key = probability_key
        self.sampler = WeightedSampler(patch_size, num_samples=num_samples)

    def __call__(self, data: Mapping) -> list[dict]:
        d = dict(data)
        keys, spatial_shape = self._keys_and_shape(d)
        probability_map = _required_entry(d, self.probability_key, "probability_key")
        _check_matches_keys(probability_map, spatial_shape, "probability_key", self.probability_key)
        self.sampler.randomize(probability_map, name=f"probability_key {self.probability_key!r}")
        return self._crop_keys(d, keys)


class LabelSamplerd(_RandomPatchSamplerd):
    """Dictionary version of :class:`~monai_patchqueue.LabelSampler`.

    Args:
        keys: keys to crop, all of the same spatial shape.
        patch_size: an int for every spatial dim, or one int per spatial dim.
        label_key: key of the ``(C, *spatial)`` label map (it is cropped only if it is in ``keys``).
        num_samples: how many patch dicts each call returns.
        label_probabilities: class to weight (int or str keys), see :class:`~monai_patchqueue.LabelSampler`.
        allow_missing_keys: skip keys that are absent instead of raising KeyError.

    Example:
        >>> label = torch.zeros(1, 8, 8, 8)
        >>> label[0, 4, 4, 4] = 2
        >>> sampler = LabelSamplerd(["image", "label"], 3, label_key="label", label_probabilities={"2": 1})
        >>> patch = sampler({"image": torch.rand(1, 8, 8, 8), "label": label})[0]
        >>> patch["location"], patch["label"][0, 1, 1, 1].item()
        (tensor([3, 3, 3, 6, 6, 6]), 2.0)
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: int | Sequence[int],
        label_key: str,
        num_samples: int = 1,
        label_probabilities: dict[int | str, float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.label_key = label_key
        self.sampler = LabelSampler(patch_size, num_samples=num_samples, label_probabilities=label_probabilities)

    def __call__(self, data: Mapping) -> list[dict]:
        d = dict(data)
        keys, spatial_shape = self._keys_and_shape(d)
        label = _required_entry(d, self.label_key, "label_key")
        _check_matches_keys(label, spatial_shape, "label_key", self.label_key)
        self.sampler.randomize(label, name=f"label_key {self.label_key!r}")
        return self._crop_keys(d, keys)


class GridSamplerd(_PatchSamplerd):
    """Dictionary version of :class:`~monai_patchqueue.GridSampler`: every key split on the same grid.

    Args:
        keys: keys to split, all of the same spatial shape.
        patch_size: an int for every spatial dim, or one int per spatial dim.
        patch_overlap: overlap in voxels, even and smaller than the patch.
        padding_mode: None, a MONAI/NumPy pad mode, or a number for constant padding (pads ``O / 2`` per side).
        allow_missing_keys: skip keys that are absent instead of raising KeyError.
        spatial_shape: optional image shape, only so that ``len()`` can tell the number of patches.

    Example:
        >>> patches = GridSamplerd("image", 4)({"image": torch.zeros(1, 8, 8)})
        >>> [p["location"].tolist() for p in patches]
        [[0, 0, 4, 4], [0, 4, 4, 8], [4, 0, 8, 4], [4, 4, 8, 8]]
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: int | Sequence[int],
        patch_overlap: int | Sequence[int] = 0,
        padding_mode: str | float | None = None,
        allow_missing_keys: bool = False,
        *,
        spatial_shape: Sequence[int] | None = None,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.sampler = GridSampler(patch_size, patch_overlap, padding_mode, spatial_shape=spatial_shape)

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.sampler)

    def __call__(self, data: Mapping) -> list[dict]:
        d = dict(data)
        keys, spatial_shape = self._keys_and_shape(d)
        self.sampler.locations = self.sampler.grid(spatial_shape, where=f"key {keys[0]!r}")
        return self._patch_dicts(d, keys, lambda img: self.sampler.crop(self.sampler.pad(img), self.sampler.locations))


def is_patch_sampler(transform: object) -> bool:
    """Whether ``transform`` is one of this module's samplers (not a subclass), which return their patches as
    they cut them: no other code runs on them in between, as a transform after a sampler in a ``Compose`` or an
    overriding ``__call__`` could.

    Example:
        >>> from monai.transforms import Compose
        >>> is_patch_sampler(UniformSamplerd("image", 4)), is_patch_sampler(Compose([UniformSamplerd("image", 4)]))
        (True, False)
    """
    return type(transform) in (UniformSamplerd, WeightedSamplerd, LabelSamplerd, GridSamplerd)
