"""The default policy: the target with the smallest estimated time to first token.

TTFT = queue wait + prefill of the uncached part, both at the target's own speed (policies.cost).
A deep prefix hit wins unless its queue makes it slower than prefilling elsewhere (Preble's
exploit/explore, Mooncake's TTFT-minimum), a bounded-load filter keeps a popular prefix from
pulling one target far past its share, a queue guard keeps the scorer's stall term from buying
queue wait, and near-equal estimates are broken at random so a burst of misses spreads.
"""

from __future__ import annotations

import random
from typing import Literal

from policies import cost
from policies.pieces import (
    BoundedLoad,
    CandidateSource,
    Filter,
    MatchedPlusSample,
    NearBestPicker,
    QueueGuard,
    Scorer,
    TtftScorer,
)
from policies.types import Decision, NoTarget, RequestFeatures, Snapshot

__all__ = ["PrefixAware"]


class PrefixAware:
    name = "prefix_aware"

    def __init__(
        self,
        *,
        candidates: CandidateSource | None = None,
        filters: tuple[Filter, ...] | None = None,
        guard: Filter | Literal["default"] | None = "default",
        scorer: Scorer | None = None,
        picker: NearBestPicker | None = None,
    ) -> None:
        self.source: CandidateSource = candidates if candidates is not None else MatchedPlusSample()
        self.filters: tuple[Filter, ...] = filters if filters is not None else (BoundedLoad(),)
        self.scorer: Scorer = scorer if scorer is not None else TtftScorer()
        if guard == "default":
            scorer = self.scorer
            guard = (
                QueueGuard(work_weight=scorer.work_weight, stall_weight=scorer.stall_weight)
                if isinstance(scorer, TtftScorer)
                else QueueGuard()
            )
        # Demotes rather than drops: what it refuses stays a last-resort fallback (and the reason's
        # runner-up when nothing else is left), so another replica's grab never leaves no choice.
        self.guard: Filter | None = guard
        self.picker = picker if picker is not None else NearBestPicker()

    def decide(self, features: RequestFeatures, snapshot: Snapshot, rng: random.Random) -> Decision:
        if not snapshot.targets:
            raise NoTarget("no target in snapshot")
        candidates = self.source.candidates(snapshot, rng)
        dropped: list[tuple[str, int]] = []
        for piece in self.filters:
            before = len(candidates)
            candidates = piece.keep(features, snapshot, candidates)
            if len(candidates) < before:
                dropped.append((piece.name, before - len(candidates)))
        targets = snapshot.targets
        scorer = self.scorer
        guard = self.guard
        demoted: list[tuple[float, int]] = []
        if isinstance(scorer, TtftScorer) and (guard is None or isinstance(guard, QueueGuard)):
            # One pass over the candidates gives both the scores and what the guard reads.
            work, stall, estimate = scorer.work_weight, scorer.stall_weight, cost.estimate
            estimates = [estimate(features, targets[i], work, stall) for i in candidates]
            scored = [(e[0], i) for e, i in zip(estimates, candidates, strict=True)]
            if guard is not None and len(estimates) > 1:
                mask = guard.mask(estimates)
                if False in mask:
                    demoted = [pair for pair, ok in zip(scored, mask, strict=True) if not ok]
                    scored = [pair for pair, ok in zip(scored, mask, strict=True) if ok]
        else:
            score = scorer.score
            if guard is not None and len(candidates) > 1:
                kept = set(guard.keep(features, snapshot, candidates))
                demoted = [(score(features, snapshot, i), i) for i in candidates if i not in kept]
                candidates = [i for i in candidates if i in kept]
            scored = [(score(features, snapshot, i), i) for i in candidates]
        if demoted and guard is not None:
            dropped.append((guard.name, len(demoted)))
        pick = self.picker.pick(snapshot, scored, rng)
        alternatives = pick.alternatives
        ranked = pick.ranked
        if demoted:
            last = sorted(demoted)
            ranked = ranked + last
            room = self.picker.fallbacks - len(alternatives)
            if room > 0:
                alternatives = alternatives + [i for _, i in last[:room]]
        chosen = targets[pick.index]
        # Scores may weigh more than TTFT; the receipt reports the TTFT estimates themselves.
        best_s = cost.ttft_s(features, chosen)
        second = next((i for _, i in ranked if i != pick.index), None)
        runner_up = None if second is None else (cost.ttft_s(features, targets[second]), second)
        return Decision(
            target=chosen.key,
            policy=self.name,
            reason=_reason(
                features,
                cached=chosen.predicted_cached_tokens,
                best_s=best_s,
                runner_up=runner_up,
                near=pick.near,
                dropped=dropped,
            ),
            predicted_cached_tokens=min(chosen.predicted_cached_tokens, features.prompt_tokens),
            predicted_ttft_s=best_s,
            alternatives=tuple(targets[i].key for i in alternatives),
        )


_DROPPED = {"bounded-load": "over load bound", "queue-guard": "behind a longer queue"}


def _reason(
    features: RequestFeatures,
    *,
    cached: int,
    best_s: float,
    runner_up: tuple[float, int] | None,
    near: int,
    dropped: list[tuple[str, int]],
) -> str:
    if cached > 0:
        head = f"prefix hit {min(cached, features.prompt_tokens)}/{features.prompt_tokens} tok"
    else:
        head = f"cache miss {features.prompt_tokens} tok"
    if runner_up is None:
        tail = f"; est ttft {best_s:.3f}s (only target)"
    else:
        tail = f"; est ttft {best_s:.3f}s vs {runner_up[0]:.3f}s next"
        if near > 1:
            tail += f" ({near} near-equal)"
    for name, count in dropped:
        tail += f"; {count} {_DROPPED.get(name, 'dropped by ' + name)}"
    return head + tail
