"""GridInferer: grid sampling + aggregation as a MONAI Inferer, a drop-in for SlidingWindowInferer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

from .._checks import check_bool, check_positive_int
from ..transforms.array import GridSampler
from ..transforms.functional import location_slices, plain_tensor
from .aggregator import GridAggregator, check_overlap_mode

__all__ = ["GridInferer"]


def _flatten(result: Any) -> tuple[list[torch.Tensor], Callable[[list], Any]]:
    """Split a network result (tensor, tuple/list or dict of tensors) into leaves and a function to rebuild it."""
    if isinstance(result, torch.Tensor):
        return [result], lambda leaves: leaves[0]
    if isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result):
        return list(result), lambda leaves: type(result)(leaves)
    if isinstance(result, dict) and all(isinstance(r, torch.Tensor) for r in result.values()):
        keys = list(result)
        return [result[k] for k in keys], lambda leaves: dict(zip(keys, leaves))
    raise TypeError(
        f"the network should return a tensor, or a tuple or dict of tensors, but returned {type(result).__name__}"
    )


def _rescaled_affine(affine: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Return the affine of an output downsampled by ``factor``: wider voxels centred on the blocks they cover."""
    ndim = len(factor)
    scale = torch.tensor(factor, dtype=affine.dtype)
    out = affine.clone()
    out[..., :ndim, ndim] += affine[..., :ndim, :ndim] @ ((scale - 1) / 2)
    out[..., :ndim, :ndim] = affine[..., :ndim, :ndim] * scale
    return out


class GridInferer(Inferer):
    """Infer on a grid of patches and blend the outputs, as TorchIO's GridSampler + GridAggregator.

    Use it wherever MONAI takes an ``Inferer`` (``SupervisedEvaluator``, bundle configs with
    ``_target_: monai_patchqueue.GridInferer``), in place of ``SlidingWindowInferer``.

    Args:
        patch_size: an int for every spatial dim, or one int per spatial dim.
        patch_overlap: overlap between neighbouring patches in voxels, even and smaller than the patch.
        overlap_mode: "crop" (each voxel from the patch it lies deepest in; exact for a convolutional network
            whose receptive-field radius is at most ``overlap / 2``), "average", "hann" or "gaussian".
        padding_mode: None, a MONAI/NumPy pad mode or a number: pads ``overlap / 2`` per side before the grid.
        batch_size: patches per network call.
        sw_device: where the patches run (default: the input's device).
        device: where the output accumulates (default: the input's device), e.g. patches on GPU, output on CPU.
        progress: show a tqdm bar over the patch batches.

    Inputs are ``(B, C, *spatial)`` tensors or MetaTensors (2D or 3D); the output is ``(B, C_out, *spatial_out)``
    with the input's meta and applied operations (so ``decollate_batch``, ``Invertd`` and ``SaveImaged`` work),
    where ``spatial_out`` is ``spatial`` divided by the network's integer downsampling factor, if any. Extra
    ``args`` and ``kwargs`` reach the network; tuple or dict outputs are aggregated per item. The network's
    train/eval mode and the grad state are left as the caller set them.

    Example:
        >>> inferer = GridInferer(4, patch_overlap=2, overlap_mode="hann")
        >>> image = torch.rand(1, 1, 10, 9, 8)
        >>> torch.allclose(inferer(image, lambda patches: 2 * patches), 2 * image)
        True
    """

    def __init__(
        self,
        patch_size: int | Sequence[int],
        patch_overlap: int | Sequence[int] = 0,
        *,
        overlap_mode: str = "crop",
        padding_mode: str | float | None = None,
        batch_size: int = 4,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.sampler = GridSampler(patch_size, patch_overlap, padding_mode)
        self.overlap_mode = check_overlap_mode(overlap_mode)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.sw_device = None if sw_device is None else torch.device(sw_device)
        self.device = None if device is None else torch.device(device)
        self.progress = check_bool(progress, "progress")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Return the blended network output for every item of the ``(B, C, *spatial)`` batch ``inputs``."""
        if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5):
            shape = tuple(inputs.shape) if hasattr(inputs, "shape") else type(inputs).__name__
            raise ValueError(f"`inputs` should be a (B, C, H, W[, D]) tensor, but got {shape}")
        results = [self._infer_volume(inputs[index], network, args, kwargs) for index in range(inputs.shape[0])]
        flattened = [_flatten(result) for result in results]
        leaves_per_item = [leaves for leaves, _ in flattened]
        rebuild = flattened[0][1]
        # One item (the usual evaluation batch) needs no copy of the whole output.
        stacked = [leaves[0][None] if len(leaves) == 1 else torch.stack(leaves) for leaves in zip(*leaves_per_item)]
        return rebuild([self._with_input_meta(leaf, inputs) for leaf in stacked])

    def _batches(self, locations: np.ndarray):
        starts = range(0, len(locations), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="GridInferer", unit="batch")
        for start in starts:
            yield locations[start : start + self.batch_size]

    def _infer_volume(self, image: torch.Tensor, network: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        image = plain_tensor(image)
        spatial_shape = tuple(image.shape[1:])
        locations = self.sampler.grid(spatial_shape, where="the input")
        padded = self.sampler.pad(image)
        padded = plain_tensor(padded)
        aggregators: list[GridAggregator] = []
        rebuild = None
        new_aggregator = partial(self._aggregator, spatial_shape, self.device or image.device)
        for batch in self._batches(locations):
            rebuild = self._add_batch(padded, batch, network, args, kwargs, aggregators, new_aggregator)
        return rebuild([aggregator.get_output_tensor() for aggregator in aggregators])

    def _add_batch(self, padded, batch, network, args, kwargs, aggregators, new_aggregator) -> Callable[[list], Any]:
        """Run the network on one batch of patches and aggregate it; return how to rebuild its output structure.

        A function of its own so that the batch's patches and outputs are freed before the next batch runs: the
        peak memory is then one batch, not two.
        """
        patches = torch.stack([padded[location_slices(location)] for location in batch])
        if self.sw_device is not None:
            patches = patches.to(self.sw_device)
        leaves, rebuild = _flatten(network(patches, *args, **kwargs))
        del patches
        if not aggregators:
            aggregators.extend(new_aggregator() for _ in leaves)
        for aggregator, leaf in zip(aggregators, leaves):
            aggregator.add_batch(leaf, batch)
        return rebuild

    def _aggregator(self, spatial_shape: tuple[int, ...], device: torch.device) -> GridAggregator:
        return GridAggregator(
            spatial_shape,
            self.sampler.patch_size,
            self.sampler.patch_overlap,
            overlap_mode=self.overlap_mode,
            padding_mode=self.sampler.padding_mode,
            device=device,
        )

    @staticmethod
    def _with_input_meta(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, MetaTensor):
            return output
        result = convert_to_dst_type(output, inputs, device=output.device)[0]
        factor = [n // m for n, m in zip(inputs.shape[2:], output.shape[2:])]
        if any(f != 1 for f in factor):
            result.affine = _rescaled_affine(result.affine, factor)
        return result
