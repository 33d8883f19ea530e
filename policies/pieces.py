"""Small named building blocks policies are assembled from, in llm-d's shape:
candidates → filters → scorers → picker.

Every piece works on indices into ``snapshot.targets`` so nothing is copied per decision, and every
piece is pure (randomness only through the ``rng`` it is handed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from policies import cost
from policies.types import RequestFeatures, Snapshot

__all__ = [
    "AllTargets",
    "BoundedLoad",
    "CandidateSource",
    "Filter",
    "MatchedPlusSample",
    "NearBestPicker",
    "Pick",
    "QueueGuard",
    "Scorer",
    "TtftScorer",
    "mean_inflight",
]


class CandidateSource(Protocol):
    name: str

    def candidates(self, snapshot: Snapshot, rng: random.Random) -> list[int]: ...


class Filter(Protocol):
    name: str

    def keep(self, features: RequestFeatures, snapshot: Snapshot, candidates: list[int]) -> list[int]: ...


class Scorer(Protocol):
    """Lower is better."""

    name: str

    def score(self, features: RequestFeatures, snapshot: Snapshot, index: int) -> float: ...


def mean_inflight(snapshot: Snapshot) -> float:
    if snapshot.mean_inflight_requests is not None:
        return snapshot.mean_inflight_requests
    targets = snapshot.targets
    if not targets:
        return 0.0
    return sum(t.inflight_requests for t in targets) / len(targets)


class AllTargets:
    name = "all"

    def candidates(self, snapshot: Snapshot, rng: random.Random) -> list[int]:
        return list(range(len(snapshot.targets)))


class MatchedPlusSample:
    """Every target when the snapshot is small; otherwise the deepest prefix matches plus a random
    sample of the rest (power of d choices), so a decision stays O(cap + sample) on 1,000+ targets.
    """

    name = "matched+sample"

    def __init__(self, *, exact_up_to: int = 128, matched_cap: int = 16, sample: int = 8) -> None:
        self.exact_up_to = exact_up_to
        self.matched_cap = matched_cap
        self.sample = sample

    def candidates(self, snapshot: Snapshot, rng: random.Random) -> list[int]:
        n = len(snapshot.targets)
        if n <= self.exact_up_to:
            return list(range(n))
        chosen = list(snapshot.matched[: self.matched_cap])
        seen = set(chosen)
        # Independent draws (a repeat is skipped): a third of random.sample's cost on 1,000+ targets.
        draw = rng.random
        for _ in range(self.sample):
            index = int(draw() * n)
            if index not in seen:
                seen.add(index)
                chosen.append(index)
        return chosen


class BoundedLoad:
    """Drop targets holding more than ``factor`` × mean in-flight + ``slack`` requests, unless all do.

    Consistent hashing with bounded loads (Mirrokni et al.): the cache may pull traffic towards a
    target, but never far past its share. KubeAI uses 1.25 for stateless replicas; a DP-attention
    rank decodes a batch twice the mean at almost the same step time (decode is bandwidth-bound),
    so 2: at 1.25 a hot Zipf group was pushed onto ever more ranks, each copy a cold 2k-token
    prefill — 78.7 % hits against an oracle of 82.3 % over HTTP, 81.6 % at 2.0, with TTFT set by
    the queue terms rather than this cap (sglang-router's own rule is 1.5× and 64 requests apart).
    """

    name = "bounded-load"

    def __init__(self, factor: float = 2.0, slack: float = 2.0) -> None:
        self.factor = factor
        # Absolute headroom: at low load (mean ~0.5) one or two requests in flight barely delay a
        # prefill, and refusing the cached target for them costs a whole prompt elsewhere.
        self.slack = slack

    def keep(self, features: RequestFeatures, snapshot: Snapshot, candidates: list[int]) -> list[int]:
        limit = self.factor * mean_inflight(snapshot) + self.slack
        targets = snapshot.targets
        kept = [i for i in candidates if targets[i].inflight_requests <= limit]
        return kept or candidates


class QueueGuard:
    """Refuse targets where this request would queue longer than on the best-TTFT target, unless
    the prefill their cache saves pays for the extra wait — counted as the scorer counts it:

        keep i  iff  wait_i ≤ wait_best + (1 + work_weight + stall_weight × running_best)
                                          × max(0, prefill_best − prefill_i) + tol

    (wait = queue wait, prefill = this request's uncached prefill, in seconds at each target's
    speed; best = the lowest estimated TTFT; running_best = requests running there). This is the
    scorer's own trade-off with the running counts held equal: a deep hit behind a queue still
    beats an idle miss when the prefill it saves (which would also have stalled the decoders) is
    worth the wait, and a target with no longer a queue is always kept, so a new conversation still
    goes to an idle cold target rather than a busy warm one. What is refused is queue wait bought
    only by a *difference in running counts*: under load (25 running per target) six fewer
    decoders outweigh 20k queued prompt tokens in the stall term, and it herded consecutive misses
    onto the one target with a few fewer decoders, each behind the previous one's prefill — the
    shared-prefix replay's TTFT tail at 0.8 of cache-aware capacity (0.27–0.54 s where 0.14 s was
    free). The running counts even out within a second; the wait is all of this request's TTFT.
    """

    name = "queue-guard"

    def __init__(self, work_weight: float = 1.0, stall_weight: float = 1.0, tol_s: float = 0.002) -> None:
        self.work_weight = work_weight
        self.stall_weight = stall_weight
        self.tol_s = tol_s

    def keep(self, features: RequestFeatures, snapshot: Snapshot, candidates: list[int]) -> list[int]:
        targets = snapshot.targets
        estimates = [cost.estimate(features, targets[i], 0.0, 0.0) for i in candidates]
        mask = self.mask(estimates)
        return [i for i, ok in zip(candidates, mask, strict=True) if ok]

    def mask(self, estimates: Sequence[tuple[float, float, float, int]]) -> list[bool]:
        """Which candidates to keep, from their ``cost.estimate`` tuples (score, wait, prefill,
        running); the score is not read, so any weights will do."""
        best = estimates[0]
        best_ttft = best[1] + best[2]
        longest_wait = best[1]
        for e in estimates:
            wait = e[1]
            if wait + e[2] < best_ttft:
                best, best_ttft = e, wait + e[2]
            if wait > longest_wait:  # noqa: PLR1730 (max() costs a call per candidate)
                longest_wait = wait
        limit = best[1] + self.tol_s
        if longest_wait <= limit:
            return [True] * len(estimates)  # no queue longer than the best target's: nothing to weigh
        best_prefill = best[2]
        factor = 1.0 + self.work_weight + self.stall_weight * best[3]
        return [
            e[1] <= limit or (e[2] < best_prefill and e[1] <= limit + factor * (best_prefill - e[2]))
            for e in estimates
        ]


class TtftScorer:
    """Estimated TTFT, plus (``work_weight`` + ``stall_weight`` × running requests) × this request's
    own prefill time there.

    TTFT alone is myopic: a miss on a slightly shorter queue wins the request a few milliseconds but
    adds its whole prompt to the cluster's prefill work, which everyone queued after it pays for.
    Charging the uncached prefill once more (weight 1) counts that cost; 0 is pure TTFT. The prefill
    also stalls every request decoding on that target for as long (weight 1: their lost seconds
    count like this request's own): a new conversation, a long prefill, goes where few decode, while
    a follow-up turn, a short prefill on top of its cached history, stays with its history even on
    a busy target — which keeps the sessions spread instead of crowding the target that first held a
    shared system prompt until the load bound sends follow-ups away from their own cache.
    """

    name = "ttft"

    def __init__(self, work_weight: float = 1.0, stall_weight: float = 1.0) -> None:
        self.work_weight = work_weight
        self.stall_weight = stall_weight

    def score(self, features: RequestFeatures, snapshot: Snapshot, index: int) -> float:
        return cost.score_s(features, snapshot.targets[index], self.work_weight, self.stall_weight)


class Pick:
    """The picker's answer: the chosen index, the candidates by score, how many were near-equal,
    and the fallbacks in order of preference."""

    __slots__ = ("alternatives", "index", "near", "ranked")

    def __init__(
        self, index: int, ranked: list[tuple[float, int]], near: int, alternatives: list[int]
    ) -> None:
        self.index = index
        self.ranked = ranked
        self.near = near
        self.alternatives = alternatives


class NearBestPicker:
    """The lowest score wins, but every score within tolerance of it counts as a tie.

    Among ties the deepest predicted cache wins (keeps a prefix's KV in one place), then the fewest
    requests in flight (decode batches the estimate deems negligible still cost), and remaining
    ties are broken at random: a burst of cache misses on an idle cluster spreads instead of all
    landing on the first target (sglang #32983).
    """

    name = "near-best"

    def __init__(self, *, rel_tol: float = 0.05, abs_tol_s: float = 0.002, fallbacks: int = 8) -> None:
        self.rel_tol = rel_tol
        self.abs_tol_s = abs_tol_s
        self.fallbacks = fallbacks

    def pick(self, snapshot: Snapshot, scored: Sequence[tuple[float, int]], rng: random.Random) -> Pick:
        ranked = sorted(scored)
        best = ranked[0][0]
        bound = best + max(self.abs_tol_s, self.rel_tol * best)
        near = [index for score, index in ranked if score <= bound]
        targets = snapshot.targets
        deepest = max(targets[i].predicted_cached_tokens for i in near)
        finalists = [i for i in near if targets[i].predicted_cached_tokens == deepest]
        if len(finalists) > 1:
            lightest = min(targets[i].inflight_requests for i in finalists)
            finalists = [i for i in finalists if targets[i].inflight_requests == lightest]
        chosen = finalists[0] if len(finalists) == 1 else finalists[rng.randrange(len(finalists))]
        # Fallbacks: a random sample of the other ties (deepest cache first), then the next best —
        # were ties in index order, every gateway whose pick was taken would fall onto one target.
        others = [i for i in near if i != chosen]
        if len(others) > self.fallbacks:
            others = rng.sample(others, self.fallbacks)
        else:
            rng.shuffle(others)
        others.sort(key=lambda i: -targets[i].predicted_cached_tokens)
        if len(others) < self.fallbacks:
            others.extend(index for _, index in ranked[len(near) : len(near) + self.fallbacks - len(others)])
        return Pick(chosen, ranked, len(near), others)
