"""Small helpers shared by the replay's data structures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = ["common_prefix_length"]

S = TypeVar("S", str, Sequence[int])


def common_prefix_length(a: S, b: S) -> int:
    """Length of the common prefix of two strings or id sequences: binary search over slice
    comparisons, which run in C, instead of a Python loop per element."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low
