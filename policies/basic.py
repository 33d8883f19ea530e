"""Load-only policies: round robin, uniform random, and power-of-two-choices least load."""

from __future__ import annotations

import random

from policies.types import Decision, NoTarget, RequestFeatures, Snapshot, TargetView

__all__ = ["LeastLoad", "RandomChoice", "RoundRobin"]


def _require_targets(snapshot: Snapshot) -> tuple[TargetView, ...]:
    if not snapshot.targets:
        raise NoTarget("no target in snapshot")
    return snapshot.targets


class RoundRobin:
    """Target ``sequence mod n``: the snapshot carries the counter, so the policy stays pure."""

    name = "round_robin"

    def decide(self, features: RequestFeatures, snapshot: Snapshot, rng: random.Random) -> Decision:
        targets = _require_targets(snapshot)
        index = snapshot.sequence % len(targets)
        target = targets[index]
        return Decision(
            target=target.key,
            policy=self.name,
            reason=f"round robin #{snapshot.sequence} -> {index + 1}/{len(targets)}",
            predicted_cached_tokens=target.predicted_cached_tokens,
        )


class RandomChoice:
    name = "random"

    def decide(self, features: RequestFeatures, snapshot: Snapshot, rng: random.Random) -> Decision:
        targets = _require_targets(snapshot)
        index = rng.randrange(len(targets))
        target = targets[index]
        return Decision(
            target=target.key,
            policy=self.name,
            reason=f"random {index + 1}/{len(targets)}",
            predicted_cached_tokens=target.predicted_cached_tokens,
        )


def _load(target: TargetView) -> tuple[int, int]:
    return (target.inflight_requests, target.inflight_prefill_tokens)


class LeastLoad:
    """Power of two choices (Mitzenmacher): sample two targets, take the one with fewer requests in
    flight (then fewer queued prefill tokens). Nearly as balanced as a full scan, O(1), and two
    gateways sampling independently do not herd onto the same least-loaded target.
    """

    name = "least_load"

    def decide(self, features: RequestFeatures, snapshot: Snapshot, rng: random.Random) -> Decision:
        targets = _require_targets(snapshot)
        if len(targets) == 1:
            first = second = targets[0]
        else:
            i, j = rng.sample(range(len(targets)), 2)
            first, second = targets[i], targets[j]
        chosen, other = (second, first) if _load(second) < _load(first) else (first, second)
        return Decision(
            target=chosen.key,
            policy=self.name,
            reason=(f"least load of 2: {chosen.inflight_requests} in flight vs {other.inflight_requests}"),
            predicted_cached_tokens=chosen.predicted_cached_tokens,
            alternatives=() if other is chosen else (other.key,),
        )
