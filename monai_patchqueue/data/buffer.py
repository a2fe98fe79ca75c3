"""The queue's patch buffer: patches from several subjects, popped at random or first in, first out."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["PatchBuffer"]


class PatchBuffer:
    """Hold patches and pop them uniformly at random (with ``rng``) or in arrival order (``rng=None``).

    A random pop swaps the chosen patch with the last one, so it costs O(1) whatever the buffer's length.

    Example:
        >>> buffer = PatchBuffer(rng=None)
        >>> buffer.extend(["a", "b"])
        >>> buffer.pop(), len(buffer)
        ('a', 1)
    """

    def __init__(self, rng: np.random.Generator | None) -> None:
        self._rng = rng
        self._items: deque | list = deque() if rng is None else []

    def __len__(self) -> int:
        return len(self._items)

    def extend(self, patches: list[Any]) -> None:
        """Add ``patches`` to the buffer."""
        self._items.extend(patches)

    def replace(self, function: Callable[[Any], Any]) -> int:
        """Replace every patch by ``function(patch)``, in place (the order, and so the stream, is unchanged);
        return how many patches ``function`` returned another object for.

        Example:
            >>> buffer = PatchBuffer(rng=None)
            >>> buffer.extend([1, 2])
            >>> buffer.replace(lambda patch: 10 * patch if patch > 1 else patch)
            1
            >>> buffer.pop(), buffer.pop()
            (1, 20)
        """
        replaced = 0
        for index, patch in enumerate(self._items):
            new = function(patch)
            replaced += new is not patch
            self._items[index] = new
        return replaced

    def pop(self) -> Any:
        """Remove and return one patch; raise IndexError when empty."""
        if not self._items:
            raise IndexError("pop from an empty PatchBuffer")
        if self._rng is None:
            return self._items.popleft()
        index = int(self._rng.integers(len(self._items)))
        items = self._items
        items[index], items[-1] = items[-1], items[index]
        return items.pop()
