"""The default policy: the target with the smallest estimated time to first token.

TTFT = queue wait + prefill of the uncached part, both at the target's own speed (policies.cost).
A deep prefix hit wins unless its queue makes it slower than prefilling elsewhere (Preble's
exploit/explore, Mooncake's TTFT-minimum), a bounded-load filter keeps a popular prefix from
pulling one target far past its share, and near-equal estimates are broken at random so a burst
of misses spreads.
"""

from __future__ import annotations

import random

from policies import cost
from policies.pieces import (
    BoundedLoad,
    CandidateSource,
    Filter,
    MatchedPlusSample,
    NearBestPicker,
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
        scorer: Scorer | None = None,
        picker: NearBestPicker | None = None,
    ) -> None:
        self.source: CandidateSource = candidates if candidates is not None else MatchedPlusSample()
        self.filters: tuple[Filter, ...] = filters if filters is not None else (BoundedLoad(),)
        self.scorer: Scorer = scorer if scorer is not None else TtftScorer()
        self.picker = picker if picker is not None else NearBestPicker()

    def decide(self, features: RequestFeatures, snapshot: Snapshot, rng: random.Random) -> Decision:
        if not snapshot.targets:
            raise NoTarget("no target in snapshot")
        candidates = self.source.candidates(snapshot, rng)
        considered = len(candidates)
        for piece in self.filters:
            candidates = piece.keep(features, snapshot, candidates)
        score = self.scorer.score
        scored = [(score(features, snapshot, i), i) for i in candidates]
        pick = self.picker.pick(snapshot, scored, rng)
        targets = snapshot.targets
        chosen = targets[pick.index]
        # Scores may weigh more than TTFT; the receipt reports the TTFT estimates themselves.
        best_s = cost.ttft_s(features, chosen)
        second = next((i for _, i in pick.ranked if i != pick.index), None)
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
                filtered=considered - len(candidates),
            ),
            predicted_cached_tokens=min(chosen.predicted_cached_tokens, features.prompt_tokens),
            predicted_ttft_s=best_s,
            alternatives=tuple(targets[i].key for i in pick.alternatives),
        )


def _reason(
    features: RequestFeatures,
    *,
    cached: int,
    best_s: float,
    runner_up: tuple[float, int] | None,
    near: int,
    filtered: int,
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
    if filtered:
        tail += f"; {filtered} over load bound"
    return head + tail
