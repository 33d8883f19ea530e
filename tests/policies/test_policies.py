from __future__ import annotations

import random
from collections import Counter

import msgspec
import pytest

from policies import UnknownPolicy, cost, get_policy, policy_names
from policies.pieces import MatchedPlusSample, QueueGuard, TtftScorer
from policies.prefix_aware import PrefixAware
from policies.types import NoTarget, RequestFeatures, Role, Snapshot, TargetKey, TargetView


def view(name: str, **kw: object) -> TargetView:
    fields: dict[str, object] = {
        "role": Role.REGULAR,
        "dp_size": 1,
        "capacity_tokens": 100_000,
        "prefill_tokens_per_s": 10_000.0,
        "decode_step_s": 0.02,
    }
    fields.update(kw)
    return TargetView(key=TargetKey(name), **fields)  # type: ignore[arg-type]


FEATURES = RequestFeatures(model="m", prompt_tokens=3500)


def test_registry_names_and_unknown() -> None:
    assert policy_names() == ["decode_load", "least_load", "prefix_aware", "random", "round_robin"]
    assert get_policy("round_robin").name == "round_robin"
    assert get_policy("prefix_aware") is not get_policy("prefix_aware")
    with pytest.raises(UnknownPolicy, match="choose one of"):
        get_policy("nope")


@pytest.mark.parametrize("name", policy_names())
def test_every_policy_refuses_an_empty_snapshot(name: str) -> None:
    with pytest.raises(NoTarget):
        get_policy(name).decide(FEATURES, Snapshot(targets=()), random.Random(0))


def test_round_robin_uses_the_sequence() -> None:
    targets = tuple(view(n) for n in "abc")
    policy = get_policy("round_robin")
    picks = [
        policy.decide(FEATURES, Snapshot(targets, sequence=s), random.Random(0)).target.worker
        for s in range(5)
    ]
    assert picks == ["a", "b", "c", "a", "b"]


def test_random_is_pinned_by_seed() -> None:
    targets = tuple(view(n) for n in "abcd")
    policy = get_policy("random")
    rng = random.Random(42)
    picks = [policy.decide(FEATURES, Snapshot(targets), rng).target.worker for _ in range(8)]
    assert picks == ["a", "a", "c", "b", "b", "b", "a", "a"]
    rng = random.Random(42)
    assert picks == [policy.decide(FEATURES, Snapshot(targets), rng).target.worker for _ in range(8)]


def test_least_load_takes_the_lighter_of_two() -> None:
    targets = (view("a", inflight_requests=5), view("b", inflight_requests=1), view("c", inflight_requests=3))
    policy = get_policy("least_load")
    rng = random.Random(1)
    picks = Counter(policy.decide(FEATURES, Snapshot(targets), rng).target.worker for _ in range(300))
    assert "a" not in picks  # the heaviest never wins a pair
    assert picks["b"] > picks["c"] > 0  # b wins every pair it is in, c only against a
    decision = policy.decide(FEATURES, Snapshot(targets), random.Random(7))
    assert decision.reason.startswith("least load of 2")
    assert len(decision.alternatives) == 1


def test_prefix_aware_prefers_the_prefix_hit() -> None:
    targets = (view("a"), view("b", predicted_cached_tokens=3072), view("c"))
    decision = get_policy("prefix_aware").decide(FEATURES, Snapshot(targets), random.Random(0))
    assert decision.target.worker == "b"
    assert decision.predicted_cached_tokens == 3072
    # 428 uncached tokens at 10k tok/s vs the whole 3500
    assert decision.reason == "prefix hit 3072/3500 tok; est ttft 0.043s vs 0.350s next"
    assert decision.predicted_ttft_s == pytest.approx(0.0428)
    assert set(k.worker for k in decision.alternatives) == {"a", "c"}


def test_prefix_aware_leaves_a_hit_whose_queue_makes_it_slower() -> None:
    # b holds most of the prompt but 4 s of prefill is queued ahead of it there
    targets = (
        view("a"),
        view("b", predicted_cached_tokens=3072, inflight_prefill_tokens=40_000, inflight_requests=1),
    )
    decision = get_policy("prefix_aware").decide(FEATURES, Snapshot(targets), random.Random(0))
    assert decision.target.worker == "a"
    assert decision.reason.startswith("cache miss 3500 tok; est ttft 0.350s vs 4.053s next")


def test_prefix_aware_compares_unequal_speeds_in_seconds() -> None:
    slow = {"prefill_tokens_per_s": 5_000.0}
    fast = {"prefill_tokens_per_s": 20_000.0}
    idle = (view("slow", **slow), view("fast", **fast))
    policy = get_policy("prefix_aware")
    assert policy.decide(FEATURES, Snapshot(idle), random.Random(0)).target.worker == "fast"
    # a deep hit on the slow node beats a full prefill on the fast one (0.1 s vs 0.175 s) ...
    hit = (view("slow", predicted_cached_tokens=3000, **slow), view("fast", **fast))
    assert policy.decide(FEATURES, Snapshot(hit), random.Random(0)).target.worker == "slow"
    # ... but a shallow one does not (0.5 s vs 0.175 s)
    shallow = (view("slow", predicted_cached_tokens=1000, **slow), view("fast", **fast))
    assert policy.decide(FEATURES, Snapshot(shallow), random.Random(0)).target.worker == "fast"


def test_prefix_aware_spreads_a_burst_of_misses() -> None:
    targets = tuple(view(f"t{i}") for i in range(8))
    policy = get_policy("prefix_aware")
    rng = random.Random(3)
    # Same stale snapshot for every request (as several gateways between syncs would see it):
    picks = Counter(policy.decide(FEATURES, Snapshot(targets), rng).target.worker for _ in range(64))
    assert len(picks) == 8
    assert max(picks.values()) <= 16
    # With the load of each routed request visible, eight requests land on eight targets.
    live = list(targets)
    chosen = []
    for _ in range(8):
        key = policy.decide(FEATURES, Snapshot(tuple(live)), rng).target
        chosen.append(key.worker)
        i = next(i for i, t in enumerate(live) if t.key == key)
        live[i] = msgspec.structs.replace(
            live[i], inflight_requests=live[i].inflight_requests + 1, inflight_prefill_tokens=3500
        )
    assert len(set(chosen)) == 8


def test_prefix_aware_bounded_load_overrides_a_hit() -> None:
    hot = view("hot", predicted_cached_tokens=3400, inflight_requests=10)
    targets = (hot, view("a"), view("b"), view("c"))
    decision = get_policy("prefix_aware").decide(FEATURES, Snapshot(targets), random.Random(0))
    assert decision.target.worker != "hot"  # 10 > 2 x mean 2.5 + 2
    # when every target is over the bound, the bound is ignored
    crowded = tuple(msgspec.structs.replace(t, inflight_requests=10) for t in targets)
    decision = get_policy("prefix_aware").decide(FEATURES, Snapshot(crowded), random.Random(0))
    assert decision.target.worker == "hot"


def test_prefix_aware_is_deterministic_given_the_seed() -> None:
    targets = tuple(view(f"t{i}", inflight_requests=i % 3) for i in range(6))
    policy = get_policy("prefix_aware")
    first = [policy.decide(FEATURES, Snapshot(targets), random.Random(11)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert first[0].target.worker == "t3"  # t0 and t3 are the idle ones; the seed picks t3


def test_prefix_aware_on_a_large_snapshot_looks_at_matches_and_a_sample() -> None:
    targets = [view(f"t{i:04d}", inflight_requests=1) for i in range(1024)]
    targets[700] = msgspec.structs.replace(targets[700], predicted_cached_tokens=3400)
    snapshot = Snapshot(tuple(targets), matched=(700,), mean_inflight_requests=1.0)
    source = MatchedPlusSample()
    candidates = source.candidates(snapshot, random.Random(0))
    assert candidates[0] == 700
    assert len(candidates) == 9  # 1 match + 8 drawn (this seed draws no repeat)
    decision = get_policy("prefix_aware").decide(FEATURES, snapshot, random.Random(0))
    assert decision.target.worker == "t0700"


def _random_case(rng: random.Random) -> tuple[TargetView, RequestFeatures]:
    """A target in any state the cost model tells apart (zero speed, reports or none, hits), and a prompt."""
    target = view(
        "t",
        prefill_tokens_per_s=rng.choice([0.0, 800.0, 12_000.0]),
        decode_step_s=rng.random() / 10,
        inflight_requests=rng.randint(0, 3),
        inflight_prefill_tokens=rng.randint(0, 9000),
        reported_waiting=rng.choice([None, 0, 4]),
        reported_running=rng.choice([None, 0, 7]),
        reported_waiting_tokens=rng.choice([None, 0, 5000]),
        predicted_cached_tokens=rng.randint(0, 5000),
        sibling_prefill_tokens=rng.choice([0, 3000]),
    )
    return target, RequestFeatures(model="m", prompt_tokens=rng.randint(0, 4000))


def test_inlined_ttft_matches_its_definition() -> None:
    rng = random.Random(5)
    for _ in range(500):
        target, features = _random_case(rng)
        speed = max(target.prefill_tokens_per_s, 1.0)
        expected = cost.queue_wait_s(target) + cost.uncached_tokens(features, target) / speed
        assert cost.ttft_s(features, target) == pytest.approx(expected)
        weighted = expected + 0.7 * cost.uncached_tokens(features, target) / speed
        assert cost.score_s(features, target, 0.7) == pytest.approx(weighted)
        uncached = cost.uncached_tokens(features, target)
        stalled = weighted + 0.5 * cost.running_requests(target) * uncached / speed
        assert cost.score_s(features, target, 0.7, 0.5) == pytest.approx(stalled)


def _chat_cluster(cached_on_a: int) -> tuple[TargetView, ...]:
    # The multi-round replay's shape: a and b each decode four conversations and hold the shared
    # 2,048-token system prompt (a may also hold this user's history); c is idle and cold.
    busy = {"inflight_requests": 4, "reported_running": 4}
    return (
        view("a", predicted_cached_tokens=cached_on_a, **busy),
        view("b", predicted_cached_tokens=2048, **busy),
        view("c"),
    )


def test_prefix_aware_keeps_a_follow_up_turn_on_its_history_despite_decoders() -> None:
    # Turn 2 of a's conversation: 260 new tokens on 3,200 cached ones. Its short prefill stalls a's
    # decoders only briefly, so it stays with its history rather than re-prefilling 3,460 on c.
    features = RequestFeatures(model="m", prompt_tokens=3460)
    decision = get_policy("prefix_aware").decide(features, Snapshot(_chat_cluster(3200)), random.Random(0))
    assert decision.target.worker == "a"
    assert decision.predicted_cached_tokens == 3200


def test_prefix_aware_sends_a_new_conversation_where_few_decode() -> None:
    # A new conversation hits only the 2,048-token system prompt: its 1,152-token prefill would stall
    # four decoders on a or b, while on idle c its 3,200 tokens stall nobody. Without the stall term
    # the system-prompt hit wins, new sessions crowd a and b, and the load bound later pushes their
    # follow-up turns away from their own history (81.5 % vs 87.5 % oracle in the replay).
    features = RequestFeatures(model="m", prompt_tokens=3200)
    snapshot = Snapshot(_chat_cluster(2048))
    rng = random.Random(0)
    assert get_policy("prefix_aware").decide(features, snapshot, rng).target.worker == "c"
    myopic = PrefixAware(scorer=TtftScorer(stall_weight=0.0))
    assert myopic.decide(features, snapshot, rng).target.worker in {"a", "b"}


def _herd_cluster() -> tuple[TargetView, ...]:
    # The shared-prefix replay at 0.8 of cache-aware capacity: every target decodes ~25 requests;
    # "a" decodes six fewer but one cold prompt is already queued there (a miss routed just before).
    return (
        view("a", inflight_requests=20, reported_running=19, inflight_prefill_tokens=3500),
        view("b", inflight_requests=26, reported_running=26),
        view("c", inflight_requests=26, reported_running=26),
    )


def test_prefix_aware_does_not_queue_a_miss_behind_another_to_spare_decoders() -> None:
    # A second cold miss: on a it waits 0.35 s behind the first one's prefill (TTFT 0.71 s), on b or
    # c it starts at once (0.36 s). The stall term alone (6 fewer decoders × 0.35 s) prefers a;
    # the queue guard refuses to buy queue wait with it.
    snapshot = Snapshot(_herd_cluster())
    decision = get_policy("prefix_aware").decide(FEATURES, snapshot, random.Random(0))
    assert decision.target.worker in {"b", "c"}
    assert "1 behind a longer queue" in decision.reason
    unguarded = PrefixAware(guard=None)
    assert unguarded.decide(FEATURES, snapshot, random.Random(0)).target.worker == "a"
    assert QueueGuard().keep(FEATURES, snapshot, [0, 1, 2]) == [1, 2]


def test_queue_guard_keeps_a_hit_whose_savings_pay_for_its_queue() -> None:
    # b: 3,000 of 3,500 tokens cached behind 0.4 s of queue (TTFT 0.46 s); a and c: misses with no
    # queue (TTFT 0.36 s, the best). The 0.3 s of prefill b saves would also have stalled a's two
    # decoders: the scorer counts it (1 + work 1 + stall 1 × 2 running) = 4 times, 1.2 s, so b's
    # extra 0.4 s of wait is paid for, the guard keeps it and the scorer picks it.
    busy = {"inflight_requests": 2, "reported_running": 2}
    targets = (
        view("a", **busy),
        view("b", predicted_cached_tokens=3000, inflight_prefill_tokens=4000, **busy),
        view("c", **busy),
    )
    snapshot = Snapshot(targets)
    assert QueueGuard().keep(FEATURES, snapshot, [0, 1, 2]) == [0, 1, 2]
    decision = get_policy("prefix_aware").decide(FEATURES, snapshot, random.Random(0))
    assert decision.target.worker == "b"
    # Behind 1.3 s of queue (more than the 1.2 s its savings are worth) the hit is refused, but it
    # stays the last fallback.
    deeper = (targets[0], msgspec.structs.replace(targets[1], inflight_prefill_tokens=13_000), targets[2])
    assert QueueGuard().keep(FEATURES, Snapshot(deeper), [0, 1, 2]) == [0, 2]
    decision = get_policy("prefix_aware").decide(FEATURES, Snapshot(deeper), random.Random(0))
    assert decision.target.worker in {"a", "c"}
    assert decision.alternatives[-1].worker == "b"
    # The new-conversation case: an idle cold target has no longer a queue, so it is always kept.
    new_chat = RequestFeatures(model="m", prompt_tokens=3200)
    assert QueueGuard().keep(new_chat, Snapshot(_chat_cluster(2048)), [0, 1, 2]) == [0, 1, 2]


def test_one_pass_estimate_matches_the_separate_definitions() -> None:
    rng = random.Random(9)
    for _ in range(500):
        target, features = _random_case(rng)
        score, wait, prefill, running = cost.estimate(features, target, 0.7, 0.5)
        running_there = cost.running_requests(target)
        assert score == pytest.approx(
            cost.ttft_s(features, target) + (0.7 + 0.5 * running_there) * cost.prefill_s(features, target)
        )
        assert wait == pytest.approx(cost.queue_wait_s(target))
        assert prefill == pytest.approx(cost.prefill_s(features, target))
        assert running == cost.running_requests(target)
        assert wait + prefill == pytest.approx(cost.ttft_s(features, target))
