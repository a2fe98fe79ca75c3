"""Argument validators whose errors name the argument and the value received."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "check_bool",
    "check_label_probabilities",
    "check_non_negative_int",
    "check_padding_mode",
    "check_patch_fits",
    "check_patch_overlap",
    "check_positive_int",
    "check_seed",
    "expand_to_spatial_dims",
    "spatial_sizes",
]


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as a Python int, or raise if it is not a positive integer.

    Example:
        >>> check_positive_int(4, "num_samples")
        4
    """
    if not _is_integer(value):
        raise TypeError(f"`{name}` should be a positive integer, but got {name}={value!r}")
    if value < 1:
        raise ValueError(f"`{name}` should be a positive integer, but got {name}={int(value)}")
    return int(value)


def check_non_negative_int(value: object, name: str, expected: str = "a non-negative integer") -> int:
    """Return ``value`` as a Python int, or raise a ValueError naming ``name`` and saying it should be
    ``expected``.

    Example:
        >>> check_non_negative_int(0, "num_workers")
        0
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` should be {expected}, but got {name}={value!r}")
    return int(value)


def check_seed(seed: object) -> int:
    """Return ``seed`` as a Python int, drawing one from the operating system for None.

    Example:
        >>> check_seed(7), 0 <= check_seed(None) < 2**63
        (7, True)
    """
    if seed is None:
        return int(np.random.SeedSequence().entropy % 2**63)
    return check_non_negative_int(seed, "seed", "a non-negative integer or None")


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool, or raise a TypeError naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` should be True or False, but got {name}={value!r}")
    return bool(value)


def spatial_sizes(value: object, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Normalise an int or a sequence of 2 or 3 ints to a tuple of Python ints, each at least ``minimum``.

    A single int is returned as a 1-tuple and broadcast later by :func:`expand_to_spatial_dims`.

    Example:
        >>> spatial_sizes(8, "patch_size")
        (8,)
        >>> spatial_sizes([8, 8, 4], "patch_size")
        (8, 8, 4)
    """
    items = (value,) if _is_integer(value) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, np.ndarray)):
        raise TypeError(f"`{name}` should be an int or a sequence of ints, but got {name}={value!r}")
    items = tuple(items)
    if len(items) not in (1, 2, 3):
        raise ValueError(
            f"`{name}` should be one int or one int per spatial dim (2 or 3), "
            f"but got {len(items)} values: {name}={list(items)}"
        )
    if not all(_is_integer(item) for item in items):
        raise TypeError(f"`{name}` should contain integers only, but got {name}={list(items)}")
    sizes = tuple(int(item) for item in items)
    if any(size < minimum for size in sizes):
        bound = "positive" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"every value of `{name}` should be {bound}, but got {name}={list(sizes)}")
    return sizes


def expand_to_spatial_dims(sizes: tuple[int, ...], ndim: int, name: str) -> tuple[int, ...]:
    """Broadcast a 1-tuple to ``ndim`` values, or check that ``sizes`` has ``ndim`` values.

    Example:
        >>> expand_to_spatial_dims((8,), 3, "patch_size")
        (8, 8, 8)
    """
    if len(sizes) == 1:
        return sizes * ndim
    if len(sizes) != ndim:
        raise ValueError(f"`{name}` {tuple(sizes)} has {len(sizes)} values but the image has {ndim} spatial dims")
    return sizes


PAD_MODES = frozenset(
    {"constant", "edge", "empty", "linear_ramp", "maximum", "mean", "median", "minimum", "reflect",
     "replicate", "circular", "symmetric", "wrap"}
)  # fmt: skip


def check_padding_mode(padding_mode: object) -> str | float | None:
    """Return ``padding_mode``: None, a MONAI/NumPy pad mode, or a number (as a float) for constant padding.

    Example:
        >>> check_padding_mode(0), check_padding_mode("reflect"), check_padding_mode(None)
        (0.0, 'reflect', None)
    """
    if padding_mode is None or (isinstance(padding_mode, str) and padding_mode in PAD_MODES):
        return padding_mode
    if isinstance(padding_mode, numbers.Real) and not isinstance(padding_mode, bool):
        return float(padding_mode)
    raise ValueError(
        f"`padding_mode` should be None, a number (constant padding) or one of {sorted(PAD_MODES)}, "
        f"but got padding_mode={padding_mode!r}"
    )


def check_patch_fits(patch_size: Sequence[int], spatial_shape: Sequence[int], where: str) -> None:
    """Raise a ValueError if the patch is larger than the image along any axis.

    Args:
        patch_size: the patch size, one int per spatial dim.
        spatial_shape: the image's spatial shape.
        where: what holds the image, for the message (e.g. "key 'image'").
    """
    if any(p > n for p, n in zip(patch_size, spatial_shape)):
        raise ValueError(
            f"`patch_size` {tuple(patch_size)} exceeds the spatial shape {tuple(spatial_shape)} of {where}; "
            "pad first (e.g. monai.transforms.SpatialPadd)"
        )


def check_patch_overlap(patch_overlap: Sequence[int], patch_size: Sequence[int]) -> None:
    """Raise a ValueError unless every overlap is even and smaller than the patch."""
    if any(o % 2 for o in patch_overlap):
        raise ValueError(f"`patch_overlap` should be even along every axis, but got {tuple(patch_overlap)}")
    if any(o >= p for o, p in zip(patch_overlap, patch_size)):
        raise ValueError(
            f"`patch_overlap` {tuple(patch_overlap)} should be smaller than `patch_size` {tuple(patch_size)} "
            "along every axis"
        )


def check_label_probabilities(value: object) -> dict[int, float] | None:
    """Return ``label_probabilities`` with int keys and float values, or raise naming the bad entry.

    Keys may be ints or strings of ints (so JSON configs work); values are non-negative finite numbers,
    at least one of them positive.

    Example:
        >>> check_label_probabilities({"0": 0, "1": 2, 2: 1.5})
        {0: 0.0, 1: 2.0, 2: 1.5}
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise TypeError(f"`label_probabilities` should be a non-empty mapping of class to weight, but got {value!r}")
    parsed: dict[int, float] = {}
    for key, weight in value.items():
        try:
            label_class = int(key) if not isinstance(key, float) else None
        except (TypeError, ValueError):
            label_class = None
        if label_class is None or isinstance(key, bool):
            raise ValueError(f"`label_probabilities` keys should be ints or strings of ints, but got key {key!r}")
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not 0 <= weight < float("inf"):
            raise ValueError(
                f"`label_probabilities` weights should be non-negative finite numbers, but got {key!r}: {weight!r}"
            )
        if label_class in parsed:
            raise ValueError(f"`label_probabilities` names class {label_class} twice")
        parsed[label_class] = float(weight)
    if not any(weight > 0 for weight in parsed.values()):
        raise ValueError(f"`label_probabilities` should have at least one positive weight, but got {dict(value)}")
    return parsed
