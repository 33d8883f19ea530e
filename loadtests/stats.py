"""Summary statistics for benchmark results (no numpy needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["coefficient_of_variation", "mean", "percentile"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError("q must be within [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * fraction)


def mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def coefficient_of_variation(values: Sequence[float]) -> float | None:
    """Population standard deviation over mean: 0 for a perfectly even spread; None when the mean
    is 0 or there are no values."""
    if not values:
        return None
    average = sum(values) / len(values)
    if average == 0:
        return None
    variance = sum((v - average) ** 2 for v in values) / len(values)
    return math.sqrt(variance) / average
