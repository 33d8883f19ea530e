"""Open-loop arrival times."""

from __future__ import annotations

import math
import random

__all__ = ["poisson_arrivals"]


def poisson_arrivals(count: int, rate_per_s: float | None, rng: random.Random) -> list[float]:
    """``count`` arrival times of a Poisson process at ``rate_per_s`` (None or inf: all at 0)."""
    if rate_per_s is not None and rate_per_s <= 0:
        raise ValueError("rate_per_s must be positive (or None for all at once)")
    if rate_per_s is None or math.isinf(rate_per_s):
        return [0.0] * count
    now = 0.0
    times = []
    for _ in range(count):
        now += rng.expovariate(rate_per_s)
        times.append(now)
    return times
