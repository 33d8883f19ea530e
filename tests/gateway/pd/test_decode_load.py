"""policies.decode_load: decode targets judged by requests and KV use; ties broken at random."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from policies.decode_load import DecodeLoad
from policies.types import NoTarget, RequestFeatures, Role, Snapshot, TargetKey, TargetView

FEATURES = RequestFeatures(model="m", prompt_tokens=1000, max_new_tokens=200)


def view(
    name: str,
    *,
    inflight: int = 0,
    running: int | None = None,
    waiting: int | None = None,
    usage: float | None = None,
    reserved_tokens: int = 0,
    capacity: int = 100_000,
) -> TargetView:
    return TargetView(
        key=TargetKey(name, 0),
        role=Role.DECODE,
        dp_size=1,
        capacity_tokens=capacity,
        prefill_tokens_per_s=10_000.0,
        decode_step_s=0.02,
        inflight_requests=inflight,
        inflight_prefill_tokens=reserved_tokens,
        reported_running=running,
        reported_waiting=waiting,
        reported_token_usage=usage,
    )


def decide(*targets: TargetView, seed: int = 0, policy: DecodeLoad | None = None) -> str:
    chosen = (policy or DecodeLoad()).decide(FEATURES, Snapshot(targets=targets), random.Random(seed))
    return chosen.target.worker


def test_fewest_requests_wins_reported_or_leased_whichever_is_more() -> None:
    assert decide(view("a", running=10), view("b", running=3)) == "b"
    # b reported 3 a while ago, but this gateway has since sent it 12 more.
    assert decide(view("a", running=10), view("b", running=3, inflight=12)) == "a"
    assert decide(view("a", running=4, waiting=6), view("b", running=8)) == "b"


def test_kv_use_breaks_equal_request_counts_and_a_nearly_full_cache_is_avoided() -> None:
    assert decide(view("a", running=5, usage=0.7), view("b", running=5, usage=0.2)) == "b"
    # Fewer requests, but its KV cache would overflow the limit: take the other.
    assert decide(view("a", running=2, usage=0.95), view("b", running=9, usage=0.3)) == "b"
    # Leases reserving KV count when the report is older than them.
    assert decide(view("a", running=5, reserved_tokens=60_000), view("b", running=5, usage=0.1)) == "b"


def test_when_every_target_is_nearly_full_the_least_loaded_still_wins() -> None:
    assert decide(view("a", running=9, usage=0.97), view("b", running=3, usage=0.99)) == "b"


def test_exact_ties_are_spread_at_random() -> None:
    targets = [view(name) for name in "abcd"]
    picks = Counter(decide(*targets, seed=seed) for seed in range(400))
    assert set(picks) == set("abcd")
    assert min(picks.values()) > 60


def test_power_of_two_compares_two_sampled_targets() -> None:
    policy = DecodeLoad(mode="power_of_two")
    targets = [view("idle"), *(view(f"busy{i}", running=50) for i in range(9))]
    picks = Counter(decide(*targets, seed=seed, policy=policy) for seed in range(500))
    # The idle target wins whenever it is sampled (about 2 in 10), never otherwise.
    assert 60 < picks["idle"] < 140
    assert "idle" in picks


def test_decision_explains_itself_and_names_alternatives() -> None:
    decision = DecodeLoad().decide(
        FEATURES, Snapshot(targets=(view("a", running=1), view("b", running=2))), random.Random(0)
    )
    assert decision.policy == "decode_load"
    assert decision.reason.startswith("1 req, kv 1%")
    assert decision.alternatives == (TargetKey("b", 0),)


def test_bad_configuration_and_empty_snapshots_are_refused() -> None:
    with pytest.raises(ValueError):
        DecodeLoad(mode="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DecodeLoad(kv_high=0)
    with pytest.raises(NoTarget):
        DecodeLoad().decide(FEATURES, Snapshot(targets=()), random.Random(0))
