"""GridAggregator: blend the network outputs of grid patches back into one volume.

Overlap modes: "crop" (each voxel from the patch it lies deepest in: ``overlap / 2`` trimmed per side except at
the volume border, as TorchIO), "average" (equal weights), "hann" (product of 1-D Hann windows that are never
zero) and "gaussian" (MONAI's importance map, for comparison). Outputs may be at a lower resolution than the
patch, by an integer factor per axis, in every mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map

from .._checks import (
    check_padding_mode,
    check_patch_fits,
    check_patch_overlap,
    expand_to_spatial_dims,
    spatial_sizes,
)
from ..locations import grid_locations

__all__ = ["OVERLAP_MODES", "GridAggregator", "blend_window", "check_overlap_mode", "hann_window"]

OVERLAP_MODES = ("crop", "average", "hann", "gaussian")


def check_overlap_mode(overlap_mode: object) -> str:
    """Return ``overlap_mode`` if it is one of :data:`OVERLAP_MODES`, or raise a ValueError naming it."""
    if overlap_mode not in OVERLAP_MODES:
        raise ValueError(f"`overlap_mode` should be one of {list(OVERLAP_MODES)}, but got {overlap_mode!r}")
    return overlap_mode


def hann_window(shape: Sequence[int], *, device: torch.device | str | None = None) -> torch.Tensor:
    """Return the product of 1-D Hann windows ``sin^2(pi * (i + 1) / (n + 1))``, positive everywhere.

    Example:
        >>> hann_window((3,))
        tensor([0.5000, 1.0000, 0.5000])
    """
    window = torch.ones((), device=device)
    for axis, size in enumerate(shape):
        ramp = torch.arange(1, size + 1, dtype=torch.float64, device=device) * (math.pi / (size + 1))
        view = [1] * len(shape)
        view[axis] = size
        window = window * torch.sin(ramp).pow(2).to(torch.float32).reshape(view)
    return window


def blend_window(overlap_mode: str, shape: Sequence[int], *, device: torch.device | str | None = None) -> torch.Tensor:
    """Return the per-voxel blending weights of one output patch for a weighted overlap mode."""
    if overlap_mode == "average":
        return torch.ones(tuple(shape), device=device)
    if overlap_mode == "hann":
        return hann_window(shape, device=device)
    if overlap_mode == "gaussian":  # MONAI's map reads its minimum back: built on the CPU, then moved
        return compute_importance_map(tuple(shape), mode="gaussian", sigma_scale=0.125, device="cpu").float().to(device)
    raise ValueError(f"no blending window for overlap_mode={overlap_mode!r}")


class GridAggregator:
    """Accumulate network outputs of grid patches into one volume of the original shape.

    Args:
        spatial_shape: the original (unpadded) spatial shape of the input, 2 or 3 ints.
        patch_size: the input patch size, an int or one int per spatial dim.
        patch_overlap: the grid overlap in voxels, even and smaller than the patch.
        overlap_mode: "crop", "average", "hann" or "gaussian".
        padding_mode: as given to the grid sampler; when not None the locations are in padded coordinates
            (``overlap / 2`` per side) and the padding is removed from the output.
        device: where the output accumulates (default: the device of the first batch).
        dtype: of the output (default: the first batch's dtype; in weighted modes float32 for integer and
            half-precision outputs, e.g. of a network under autocast, whose weighted sums would round).

    Memory: the output (C x spatial at output resolution) and, for weighted modes, a one-channel weight buffer.
    ``get_output_tensor()`` normalises the output in place and frees the weights, so it returns a view of the
    aggregator's buffer rather than a second whole volume; :meth:`reset` before aggregating another volume.

    Example:
        >>> from monai_patchqueue import GridSamplerd
        >>> image = torch.arange(64.0).reshape(1, 8, 8)
        >>> patches = GridSamplerd("image", 4, patch_overlap=2)({"image": image})
        >>> aggregator = GridAggregator((8, 8), 4, patch_overlap=2, overlap_mode="hann")
        >>> outputs = torch.stack([p["image"] for p in patches])  # an identity "network"
        >>> aggregator.add_batch(outputs, torch.stack([p["location"] for p in patches]))
        >>> torch.allclose(aggregator.get_output_tensor(), image)
        True
    """

    def __init__(
        self,
        spatial_shape: Sequence[int],
        patch_size: int | Sequence[int],
        patch_overlap: int | Sequence[int] = 0,
        *,
        overlap_mode: str = "crop",
        padding_mode: str | float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.spatial_shape = spatial_sizes(spatial_shape, "spatial_shape")
        ndim = len(self.spatial_shape)
        if ndim not in (2, 3):
            raise ValueError(f"`spatial_shape` should have 2 or 3 values, but got {list(self.spatial_shape)}")
        self.patch_size = expand_to_spatial_dims(spatial_sizes(patch_size, "patch_size"), ndim, "patch_size")
        overlap = spatial_sizes(patch_overlap, "patch_overlap", minimum=0)
        self.patch_overlap = expand_to_spatial_dims(overlap, ndim, "patch_overlap")
        check_patch_overlap(self.patch_overlap, self.patch_size)
        self.overlap_mode = check_overlap_mode(overlap_mode)
        self.padded = check_padding_mode(padding_mode) is not None
        self.padding = tuple(o // 2 for o in self.patch_overlap) if self.padded else (0,) * ndim
        self.padded_shape = tuple(n + 2 * p for n, p in zip(self.spatial_shape, self.padding))
        check_patch_fits(self.patch_size, self.padded_shape, "the input" + (" after padding" if self.padded else ""))
        self.num_patches = len(grid_locations(self.padded_shape, self.patch_size, self.patch_overlap))
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        """Forget everything added, to aggregate another volume."""
        self._output: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._window: torch.Tensor | None = None
        self._factor: tuple[int, ...] | None = None
        self._added = 0
        self._normalised = False

    def _downsampling_factor(self, output_patch: Sequence[int]) -> tuple[int, ...]:
        factor = tuple(p // o if o and p % o == 0 else 0 for p, o in zip(self.patch_size, output_patch))
        sizes = (*self.padded_shape, *self.padding, *(o // 2 for o in self.patch_overlap))
        divisible = all(f and all(s % f == 0 for s in sizes[i :: len(factor)]) for i, f in enumerate(factor))
        if len(output_patch) != len(self.patch_size) or not divisible:
            raise ValueError(
                f"the network output patch {tuple(output_patch)} should be the patch {self.patch_size} divided by "
                f"an integer factor per axis that also divides the (padded) input shape {self.padded_shape} "
                f"and half the overlap {tuple(o // 2 for o in self.patch_overlap)}"
            )
        return factor

    def _initialise(self, outputs: torch.Tensor) -> None:
        self._factor = self._downsampling_factor(tuple(outputs.shape[2:]))
        shape = tuple(n // f for n, f in zip(self.padded_shape, self._factor))
        device = self.device or outputs.device
        dtype = self.dtype or outputs.dtype
        if self.overlap_mode != "crop":
            if not dtype.is_floating_point or _half_unless_asked(dtype, self.dtype):
                dtype = torch.float32  # weighted sums of integers or half-precision values would round
            self._weights = torch.zeros((1, *shape), dtype=torch.float32, device=device)
            self._window = blend_window(self.overlap_mode, outputs.shape[2:], device=device)
        # Crop mode writes every voxel exactly (get_output_tensor checks that every patch was added): no zeroing.
        allocate = torch.empty if self.overlap_mode == "crop" else torch.zeros
        self._output = allocate((outputs.shape[1], *shape), dtype=dtype, device=device)

    def _crop_margins(self, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return how much to trim at the start and the end of a patch in crop mode (input resolution)."""
        half = np.array([o // 2 for o in self.patch_overlap])
        if self.padded:
            return half, half
        return half * (start > 0), half * (end < np.array(self.padded_shape))

    def add_batch(self, outputs: torch.Tensor, locations: torch.Tensor | np.ndarray) -> None:
        """Add the network outputs ``(B, C, *output_patch)`` of the patches at ``locations`` ``(B, 2n)``.

        Raises:
            ValueError: the batch and the locations disagree, or the output patch is not the input patch divided
                by an integer factor per axis.
            RuntimeError: after ``get_output_tensor()``, until ``reset()``.
        """
        locations = np.asarray(torch.as_tensor(locations).cpu(), dtype=np.int64).reshape(len(outputs), -1)
        ndim = len(self.patch_size)
        if outputs.ndim != ndim + 2 or locations.shape[1] != 2 * ndim:
            raise ValueError(
                f"`outputs` should be (B, C, *spatial) with {ndim} spatial dims and `locations` (B, {2 * ndim}), "
                f"but got {tuple(outputs.shape)} and {locations.shape}"
            )
        if self._normalised:
            raise RuntimeError("get_output_tensor() has finished this volume; call reset() to aggregate another one")
        if self._output is None:
            self._initialise(outputs)
        factor = np.array(self._factor)
        outputs = outputs.to(device=self._output.device, dtype=self._output.dtype)
        for output, location in zip(outputs, locations):
            start, end = location[:ndim], location[ndim:]
            if self.overlap_mode == "crop":
                trim_start, trim_end = self._crop_margins(start, end)
                inner = self._region(trim_start, np.array(self.patch_size) - trim_end, factor)
                region = self._region(start + trim_start, end - trim_end, factor)
                self._output[(slice(None), *region)] = output[(slice(None), *inner)]
            else:
                region = (slice(None), *self._region(start, end, factor))
                self._output[region] += output * self._window
                self._weights[region] += self._window
        self._added += len(outputs)

    @staticmethod
    def _region(start: np.ndarray, end: np.ndarray, factor: np.ndarray) -> tuple[slice, ...]:
        return tuple(slice(int(a), int(b)) for a, b in zip(start // factor, end // factor))

    def get_output_tensor(self) -> torch.Tensor:
        """Return the aggregated ``(C, *spatial)`` volume at output resolution, padding removed.

        Raises:
            RuntimeError: fewer patches were added than the grid holds (some voxels would be missing).
        """
        if self._output is None or self._added < self.num_patches:
            raise RuntimeError(
                f"the grid has {self.num_patches} patches but {self._added} were added: add every patch's output "
                "before get_output_tensor()"
            )
        if self._weights is not None:
            self._output.div_(self._weights)  # in place: no second whole volume at the peak
            self._weights = None
        self._normalised = True
        output, factor = self._output, self._factor
        keep = tuple(slice(p // f, (p + n) // f) for p, n, f in zip(self.padding, self.spatial_shape, factor))
        return output[(slice(None), *keep)]


def _half_unless_asked(dtype: torch.dtype, asked: torch.dtype | None) -> bool:
    """Whether ``dtype`` is a float of fewer than 32 bits that the caller did not ask for as the output's."""
    return asked is None and dtype.is_floating_point and torch.finfo(dtype).bits < 32
