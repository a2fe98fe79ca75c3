"""Array-level patch samplers: a channel-first image in, a list of patch MetaTensors out.

Each patch is a contiguous copy with its affine moved to the patch, its ``location`` (starts then exclusive
ends, int64) in its meta, and a trace entry so that :meth:`inverse` puts it back in the original volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from monai.transforms import BorderPad, InvertibleTransform, MultiSampleTrait, Randomizable
from monai.utils import TransformBackends

from .._checks import (
    check_label_probabilities,
    check_padding_mode,
    check_patch_fits,
    check_patch_overlap,
    check_positive_int,
    expand_to_spatial_dims,
    spatial_sizes,
)
from ..locations import grid_locations, patch_locations
from ..sampling import label_classes, label_starts, uniform_starts, weighted_starts
from .functional import crop_patches, plain_tensor, restore_patch, spatial_shape_of

__all__ = ["GridSampler", "LabelSampler", "PatchCropper", "UniformSampler", "WeightedSampler"]


class PatchCropper(InvertibleTransform, MultiSampleTrait):
    """Crop patches at given locations and put them back; the shared base of the samplers.

    Args:
        patch_size: an int for every spatial dim, or one int per spatial dim (2 or 3).
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(self, patch_size: int | Sequence[int]) -> None:
        self.patch_size = spatial_sizes(patch_size, "patch_size")
        self.locations: np.ndarray | None = None

    def spatial_patch_size(self, spatial_shape: Sequence[int], where: str) -> tuple[int, ...]:
        """Return the patch size for an image of ``spatial_shape``, checking that it fits."""
        patch_size = expand_to_spatial_dims(self.patch_size, len(spatial_shape), "patch_size")
        check_patch_fits(patch_size, spatial_shape, where)
        return patch_size

    def crop(self, img: torch.Tensor | np.ndarray, locations: np.ndarray) -> list[torch.Tensor]:
        """Return the patches of ``img`` at ``locations`` (``(K, 2n)`` starts then ends)."""
        return crop_patches(img, locations, self.get_transform_info() if self.tracing else None)

    def _crop_at_locations(self, img: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        if self.locations is None:
            raise RuntimeError(f"{type(self).__name__} has no locations yet: call it with randomize=True first")
        return self.crop(img, self.locations)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Put a patch back at its location in a zero volume of the original shape, with the original affine."""
        return restore_patch(data, self.pop_transform(data))


class UniformSampler(Randomizable, PatchCropper):
    """Draw patches whose starts are uniform over every position where the patch fits.

    Args:
        patch_size: an int for every spatial dim, or one int per spatial dim.
        num_samples: how many patches each call returns.

    Randomness comes from ``self.R`` only (see ``set_random_state``).

    Example:
        >>> sampler = UniformSampler(4, num_samples=2).set_random_state(0)
        >>> patches = sampler(torch.zeros(1, 8, 8, 8))
        >>> [tuple(p.shape) for p in patches]
        [(1, 4, 4, 4), (1, 4, 4, 4)]
        >>> patches[0].meta["location"]
        tensor([4, 3, 3, 8, 7, 7])
    """

    def __init__(self, patch_size: int | Sequence[int], num_samples: int = 1) -> None:
        PatchCropper.__init__(self, patch_size)
        self.num_samples = check_positive_int(num_samples, "num_samples")

    def randomize(self, spatial_shape: Sequence[int], *, where: str = "the image") -> np.ndarray:
        """Draw and return ``(num_samples, 2n)`` locations for an image of ``spatial_shape``."""
        patch_size = self.spatial_patch_size(spatial_shape, where)
        starts = uniform_starts(spatial_shape, patch_size, self.num_samples, self.R)
        self.locations = patch_locations(starts, patch_size)
        return self.locations

    def __call__(self, img: torch.Tensor | np.ndarray, randomize: bool = True) -> list[torch.Tensor]:
        """Return ``num_samples`` patches of the ``(C, *spatial)`` image ``img``."""
        if randomize:
            self.randomize(spatial_shape_of(img, "the image"))
        return self._crop_at_locations(img)


def _single_channel_map(probability_map: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    probability_map = plain_tensor(probability_map)
    spatial_shape_of(probability_map, f"`{name}`")
    if probability_map.shape[0] != 1:
        raise ValueError(
            f"`{name}` should have one channel, (1, H, W[, D]), but has shape {tuple(probability_map.shape)}"
        )
    return probability_map[0]


def _check_same_spatial_shape(img: torch.Tensor | np.ndarray, other: torch.Tensor | np.ndarray, name: str) -> None:
    image_shape = spatial_shape_of(img, "the image")
    other_shape = spatial_shape_of(other, f"`{name}`")
    if other_shape != image_shape:
        raise ValueError(f"`{name}` has spatial shape {other_shape} but the image has {image_shape}")


class WeightedSampler(Randomizable, PatchCropper):
    """Draw patches whose centres follow a probability map.

    A voxel's chance of being a patch centre is proportional to its value in the map, among the voxels where
    the whole patch fits (the first ``P // 2`` and last ``(P - 1) // 2`` voxels of each axis are excluded);
    the patch starts at ``centre - P // 2``. Values need not sum to 1.

    Args:
        patch_size: an int for every spatial dim, or one int per spatial dim.
        num_samples: how many patches each call returns.

    Raises:
        ValueError: at call, a negative, NaN or infinite map value, or no positive value among valid centres
            (never a silent fallback to uniform sampling).

    Example:
        >>> weights = torch.zeros(1, 8, 8, 8)
        >>> weights[0, 6, 2, 4] = 1.0
        >>> patch = WeightedSampler(3)(torch.zeros(1, 8, 8, 8), weights)[0]
        >>> patch.meta["location"]
        tensor([5, 1, 3, 8, 4, 6])
    """

    def __init__(self, patch_size: int | Sequence[int], num_samples: int = 1) -> None:
        PatchCropper.__init__(self, patch_size)
        self.num_samples = check_positive_int(num_samples, "num_samples")

    def randomize(self, probability_map: torch.Tensor | np.ndarray, *, name: str = "probability_map") -> np.ndarray:
        """Draw and return ``(num_samples, 2n)`` locations from a ``(1, *spatial)`` probability map."""
        weights = _single_channel_map(probability_map, name)
        patch_size = self.spatial_patch_size(tuple(weights.shape), f"`{name}`")
        starts = weighted_starts(weights, patch_size, self.num_samples, self.R, name=name)
        self.locations = patch_locations(starts, patch_size)
        return self.locations

    def __call__(
        self,
        img: torch.Tensor | np.ndarray,
        probability_map: torch.Tensor | np.ndarray | None = None,
        randomize: bool = True,
    ) -> list[torch.Tensor]:
        """Return ``num_samples`` patches of ``img`` drawn with ``probability_map`` (same spatial shape)."""
        if randomize:
            if probability_map is None:
                raise ValueError("`probability_map` is required when randomize=True")
            _check_same_spatial_shape(img, probability_map, "probability_map")
            self.randomize(probability_map)
        return self._crop_at_locations(img)


class LabelSampler(Randomizable, PatchCropper):
    """Draw patches whose centres are balanced over the classes of a label map.

    Single-channel labels: classes are voxel values. Multi-channel (one-hot) labels: classes are channel
    indices. Each class present among valid centres gets probability ``weight / sum(present weights)``, spread
    evenly over its valid voxels; absent classes are dropped with one warning per call.

    Args:
        patch_size: an int for every spatial dim, or one int per spatial dim.
        num_samples: how many patches each call returns.
        label_probabilities: class to weight (int or str keys; need not sum to 1). None: single-channel,
            uniform over the foreground (label > 0); one-hot, equal weight for every channel but channel 0.

    Example:
        >>> label = torch.zeros(1, 8, 8, 8)
        >>> label[0, 2:6, 2:6, 2:6] = 1
        >>> sampler = LabelSampler(4, num_samples=8, label_probabilities={0: 1, 1: 1}).set_random_state(0)
        >>> len(sampler(torch.zeros(1, 8, 8, 8), label))
        8
    """

    def __init__(
        self,
        patch_size: int | Sequence[int],
        num_samples: int = 1,
        label_probabilities: dict[int | str, float] | None = None,
    ) -> None:
        PatchCropper.__init__(self, patch_size)
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.label_probabilities = check_label_probabilities(label_probabilities)

    def randomize(self, label: torch.Tensor | np.ndarray, *, name: str = "label") -> np.ndarray:
        """Draw and return ``(num_samples, 2n)`` locations from a ``(C, *spatial)`` label map."""
        label = plain_tensor(label)
        spatial_shape = spatial_shape_of(label, f"`{name}`")
        patch_size = self.spatial_patch_size(spatial_shape, f"`{name}`")
        classes = label_classes(label.shape[0], self.label_probabilities)
        starts = label_starts(label, patch_size, self.num_samples, self.R, classes, name=name)
        self.locations = patch_locations(starts, patch_size)
        return self.locations

    def __call__(
        self,
        img: torch.Tensor | np.ndarray,
        label: torch.Tensor | np.ndarray | None = None,
        randomize: bool = True,
    ) -> list[torch.Tensor]:
        """Return ``num_samples`` patches of ``img`` drawn with ``label`` (same spatial shape)."""
        if randomize:
            if label is None:
                raise ValueError("`label` is required when randomize=True")
            _check_same_spatial_shape(img, label, "label")
            self.randomize(label)
        return self._crop_at_locations(img)


class GridSampler(PatchCropper):
    """Split an image into a grid of patches covering every voxel, in lexicographic order of location.

    Per axis the starts are ``range(0, N - P + 1, P - O)`` plus ``N - P`` if missing, as TorchIO's
    ``GridSampler``. With ``padding_mode`` the image is first padded by ``O / 2`` per side (locations are then
    in padded coordinates) and :meth:`inverse` removes the padding again.

    Args:
        patch_size: an int for every spatial dim, or one int per spatial dim.
        patch_overlap: overlap between neighbouring patches in voxels, even and smaller than the patch.
        padding_mode: None (no padding), a MONAI/NumPy pad mode ("constant", "reflect", "edge", ...) or a
            number (constant padding with that value).
        spatial_shape: optional image shape, only so that ``len(sampler)`` can tell the number of patches.

    Example:
        >>> sampler = GridSampler(5, patch_overlap=2)
        >>> [p.meta["location"].tolist() for p in sampler(torch.zeros(1, 10, 5))]
        [[0, 0, 5, 5], [3, 0, 8, 5], [5, 0, 10, 5]]
        >>> len(GridSampler(5, patch_overlap=2, spatial_shape=(10, 5)))
        3
    """

    def __init__(
        self,
        patch_size: int | Sequence[int],
        patch_overlap: int | Sequence[int] = 0,
        padding_mode: str | float | None = None,
        *,
        spatial_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(patch_size)
        self.patch_overlap = spatial_sizes(patch_overlap, "patch_overlap", minimum=0)
        ndim = max(len(self.patch_size), len(self.patch_overlap))
        if min(len(self.patch_size), len(self.patch_overlap)) > 1 and len(self.patch_size) != len(self.patch_overlap):
            raise ValueError(
                f"`patch_overlap` {self.patch_overlap} has {len(self.patch_overlap)} values but `patch_size` "
                f"{self.patch_size} has {len(self.patch_size)}"
            )
        check_patch_overlap(
            expand_to_spatial_dims(self.patch_overlap, ndim, "patch_overlap"),
            expand_to_spatial_dims(self.patch_size, ndim, "patch_size"),
        )
        self.padding_mode = check_padding_mode(padding_mode)
        self.spatial_shape = None if spatial_shape is None else spatial_sizes(spatial_shape, "spatial_shape")
        self.padder: BorderPad | None = None
        if self.padding_mode is not None:
            border = [o // 2 for o in self.patch_overlap]
            if isinstance(self.padding_mode, float):
                self.padder = BorderPad(border if len(border) > 1 else border[0], mode="constant",
                                        value=self.padding_mode)  # fmt: skip
            else:
                self.padder = BorderPad(border if len(border) > 1 else border[0], mode=self.padding_mode)

    def padded_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Return the spatial shape the grid is laid on: ``spatial_shape`` plus the padding, if any."""
        if self.padding_mode is None:
            return tuple(spatial_shape)
        overlap = expand_to_spatial_dims(self.patch_overlap, len(spatial_shape), "patch_overlap")
        return tuple(n + o for n, o in zip(spatial_shape, overlap))

    def grid(self, spatial_shape: Sequence[int], *, where: str = "the image") -> np.ndarray:
        """Return the ``(K, 2n)`` grid locations for an image of ``spatial_shape`` (padded coordinates)."""
        padded = self.padded_shape(spatial_shape)
        what = where if padded == tuple(spatial_shape) else f"{where} after padding"
        patch_size = self.spatial_patch_size(padded, what)
        overlap = expand_to_spatial_dims(self.patch_overlap, len(padded), "patch_overlap")
        check_patch_overlap(overlap, patch_size)
        return grid_locations(padded, patch_size, overlap)

    def __bool__(self) -> bool:
        return True  # a transform is truthy even when len() cannot be told

    def __len__(self) -> int:
        if self.spatial_shape is None:
            raise TypeError("len(GridSampler) needs the image shape: pass spatial_shape=... at construction")
        return len(self.grid(self.spatial_shape))

    def pad(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Return ``img`` padded by half the overlap per side (unchanged when ``padding_mode`` is None)."""
        return img if self.padder is None else self.padder(img)

    def __call__(self, img: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """Return every grid patch of the ``(C, *spatial)`` image ``img``."""
        self.locations = self.grid(spatial_shape_of(img, "the image"))
        return self.crop(self.pad(img), self.locations)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Put a grid patch back in a zero volume of the original (unpadded) shape."""
        volume = super().inverse(data)
        return volume if self.padder is None else self.padder.inverse(volume)
