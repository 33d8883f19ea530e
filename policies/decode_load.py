"""Decode-pool policy: the decode target with the least load, counted in requests and KV tokens.

A decode server's speed per user falls as its batch grows (each step reads the weights once for
the whole batch, but attention reads every running request's KV), and a server whose KV cache is
nearly full must queue or retract new arrivals. So a decode target is judged on two things: the
requests it runs (the larger of what it last reported and what gateways hold leases for, since
reports lag by up to a polling interval) and the fraction of its KV cache in use (reported, or
what the leases reserve if that is more). Targets above ``kv_high`` are avoided unless all are.

``mode="least"`` scans every target; ``"power_of_two"`` compares two sampled at random (for very
large pools, and so several gateways do not herd). Exact ties are broken at random either way.
A prefix match means nothing here: SGLang decode servers keep no radix cache by default.
"""

from __future__ import annotations

import random
from typing import Literal

from policies.types import Decision, NoTarget, RequestFeatures, Snapshot, TargetView

__all__ = ["DecodeLoad"]

_ALTERNATIVES = 3


def running_requests(target: TargetView) -> int:
    """Requests on the target: reported running + waiting, or the leases held, whichever is more."""
    reported = (target.reported_running or 0) + (target.reported_waiting or 0)
    return max(reported, target.inflight_requests)


def kv_fraction(target: TargetView, features: RequestFeatures) -> float:
    """Fraction of the target's KV cache in use once this request's tokens are added."""
    capacity = target.capacity_tokens
    if capacity <= 0:
        return 1.0
    reported = (target.reported_token_usage or 0.0) * capacity
    used = max(reported, float(target.inflight_prefill_tokens))
    return (used + features.prompt_tokens + features.max_new_tokens) / capacity


class DecodeLoad:
    """Least-loaded decode target (see the module docstring)."""

    name = "decode_load"

    def __init__(self, *, mode: Literal["least", "power_of_two"] = "least", kv_high: float = 0.9) -> None:
        if mode not in ("least", "power_of_two"):
            raise ValueError(f"mode must be 'least' or 'power_of_two', got {mode!r}")
        if not 0.0 < kv_high <= 1.0:
            raise ValueError(f"kv_high must be in (0, 1], got {kv_high}")
        self.mode = mode
        self.kv_high = kv_high

    def decide(self, features: RequestFeatures, snapshot: Snapshot, rng: random.Random) -> Decision:
        targets = snapshot.targets
        if not targets:
            raise NoTarget("no decode target in snapshot")
        if self.mode == "power_of_two" and len(targets) > 2:
            candidates = rng.sample(range(len(targets)), 2)
        else:
            candidates = list(range(len(targets)))
        kv = {i: kv_fraction(targets[i], features) for i in candidates}
        roomy = [i for i in candidates if kv[i] <= self.kv_high]
        pool = roomy or candidates
        # Requests first (they set the step time everyone on the server pays), KV use second.
        keyed = sorted((running_requests(targets[i]), round(kv[i], 3), i) for i in pool)
        best = keyed[0][:2]
        tied = [i for requests, frac, i in keyed if (requests, frac) == best]
        chosen = tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]
        target = targets[chosen]
        others = [i for _, _, i in keyed if i != chosen]
        reason = (
            f"{running_requests(target)} req, kv {kv[chosen]:.0%}"
            f" (least of {len(candidates)}{', all above kv limit' if not roomy else ''}"
            f"{f', {len(tied)} tied' if len(tied) > 1 else ''})"
        )
        return Decision(
            target=target.key,
            policy=self.name,
            reason=reason,
            predicted_cached_tokens=0,
            alternatives=tuple(targets[i].key for i in others[:_ALTERNATIVES]),
        )
