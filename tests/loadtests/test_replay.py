from __future__ import annotations

import asyncio
import itertools

import msgspec
import pytest

from gateway.registry import DEFAULT_DECODE_STEP_S, DEFAULT_NODE_PREFILL_TOKENS_PER_S
from loadtests.replay import (
    CacheAwareConfig,
    CharRadixTree,
    ClusterSpec,
    OracleCache,
    ReplayCluster,
    SglangCacheAware,
    make_router,
    replay,
    run_policies,
    summarize,
)
from loadtests.workloads import BenchRequest, generated_shared_prefix, multi_round_chat

SPEC = ClusterSpec(servers=2, dp_size=2)


def _shared_prefix() -> list[BenchRequest]:
    requests = generated_shared_prefix(
        groups=4,
        prompts_per_group=12,
        system_tokens=1500,
        question_tokens=40,
        output_tokens=8,
        rate_per_s=20.0,
    )
    return sorted(requests, key=lambda r: r.arrival_s)


def test_prefix_aware_beats_round_robin_and_oracle_bounds_every_policy() -> None:
    policies = ["prefix_aware", "round_robin", "least_load", "sglang_cache_aware"]
    summaries = asyncio.run(run_policies(_shared_prefix, policies, SPEC))
    by_name = {s.system.split("(")[0]: s for s in summaries}
    for s in summaries:
        assert s.completed == s.requests == 48
        assert s.oracle_hit_rate is not None
        assert s.hit_rate <= s.oracle_hit_rate + 1e-9
        assert s.ttft_p50_s is not None and s.ttft_p50_s > 0
        assert s.output_tok_per_s is not None and s.output_tok_per_s > 0
        assert sum(s.per_target.values()) == 48 and len(s.per_target) == 4
    # Four groups on four targets: round robin spreads every group everywhere and pays each system
    # prompt up to four times; a prefix-aware policy keeps a group together.
    assert by_name["prefix_aware"].hit_rate > by_name["round_robin"].hit_rate + 0.1
    assert by_name["sglang_cache_aware"].hit_rate > by_name["round_robin"].hit_rate + 0.1
    assert by_name["round_robin"].spread_cv == 0.0
    # Same requests, same token ids: the oracle is the same for every policy.
    assert len({round(s.oracle_hit_rate or 0, 9) for s in summaries}) == 1


def test_replay_records_match_engine_accounting_and_chat_rounds_wait_for_each_other() -> None:
    requests = multi_round_chat(
        users=3,
        rounds=3,
        system_tokens=200,
        user_context_tokens=100,
        question_tokens=20,
        answer_tokens=10,
        think_s=0.5,
        user_rate_per_s=None,
    )
    cluster = ReplayCluster(SPEC)
    records = asyncio.run(replay(requests, cluster, make_router("prefix_aware", cluster)))
    assert len(records) == 9
    by_rid = {r.rid: r for r in records}
    for user in range(3):
        rounds = [by_rid[f"chat-u{user}-r{i}"] for i in range(3)]
        for earlier, later in itertools.pairwise(rounds):
            assert earlier.finish_s is not None
            assert later.arrival_s >= earlier.finish_s + 0.5 - 1e-9
            assert later.prompt_tokens > earlier.prompt_tokens
            # The next round's prompt begins with the previous prompt, so it is (mostly) cached.
            assert later.cached_tokens >= earlier.prompt_tokens - 16
    for r in records:
        assert r.completion_tokens == 10
        assert r.first_token_s is not None and r.finish_s is not None
        assert r.arrival_s < r.first_token_s <= r.finish_s
        assert r.tpot_s is not None and r.tpot_s > 0
        assert r.cached_tokens <= r.oracle_cached_tokens


def test_replay_rejects_unsorted_arrivals() -> None:
    requests = _shared_prefix()[:3]
    swapped = [requests[1], requests[0], requests[2]]
    cluster = ReplayCluster(SPEC)
    with pytest.raises(ValueError, match="sorted"):
        asyncio.run(replay(swapped, cluster, make_router("round_robin", cluster)))


def test_oracle_is_the_longest_previously_seen_prefix_at_token_granularity() -> None:
    oracle = OracleCache(block_tokens=4)
    assert oracle.observe([1, 2, 3, 4, 5, 6, 7]) == 0
    assert oracle.observe([1, 2, 3, 4, 5, 6, 9, 9]) == 6
    assert oracle.observe([1, 2, 3]) == 3
    assert oracle.observe([1, 2, 3, 4, 5, 6, 9, 9, 1]) == 8
    assert oracle.observe([2, 1]) == 0
    assert oracle.hit_tokens == 17 and oracle.seen_tokens == 29


def test_char_tree_matches_tracks_sizes_and_evicts_lru_leaves() -> None:
    tree = CharRadixTree()
    tree.insert("hello world", "a", now=1.0)
    tree.insert("hello there", "b", now=2.0)
    assert tree.prefix_match("hello wo") == (8, "a")
    assert tree.prefix_match("hello th") == (8, "b")
    assert tree.prefix_match("help")[0] == 3
    assert tree.prefix_match("xyz")[0] == 0
    assert tree.sizes == {"a": 11, "b": 11}
    assert tree.evict_tenant_to("a", 6) == 5
    assert tree.sizes["a"] == 6
    assert tree.prefix_match("hello world") == (6, "b")
    tree.insert("hello world!", "a", now=3.0)
    assert tree.prefix_match("hello world!") == (12, "a")


def test_sglang_cache_aware_reimplementation_follows_its_documented_rules() -> None:
    policy = SglangCacheAware(["w0", "w1"], CacheAwareConfig(eviction_interval_s=0))
    first = policy.select("system prompt A " * 20 + "question 1", now=0.0)
    # A request sharing > 30% of its characters with what went to `first` follows it.
    assert policy.select("system prompt A " * 20 + "question 2", now=0.1) == first
    # A miss goes to the worker with the smallest tree (the other one).
    other = policy.select("entirely different text " * 10, now=0.2)
    assert other != first
    # Imbalance (max - min > 64 and max > 1.5 min) overrides affinity: least loaded wins.
    policy.load[first] = 100
    policy.load[other] = 10
    assert policy.select("system prompt A " * 20 + "question 3", now=0.3) == other
    policy.complete(other)
    assert policy.load[other] == 10


def test_summary_counts_unfinished_requests_but_not_their_tokens() -> None:
    cluster = ReplayCluster(SPEC)
    requests = _shared_prefix()
    records = asyncio.run(replay(requests, cluster, make_router("round_robin", cluster), max_virtual_s=0.5))
    summary = summarize("rr", records, targets=[t.label() for t in cluster.targets])
    assert summary.requests >= summary.completed
    done = [r for r in records if r.finish_s is not None]
    assert summary.prompt_tokens == sum(r.prompt_tokens for r in done)
    assert msgspec.json.decode(msgspec.json.encode(summary))["system"] == "rr"


def test_cluster_speed_seeds_mirror_the_registry_or_are_measured_from_the_engine() -> None:
    registry = ReplayCluster(SPEC)
    assert registry.workers[0].prefill_tokens_per_s == DEFAULT_NODE_PREFILL_TOKENS_PER_S / SPEC.dp_size
    assert registry.workers[0].decode_step_s == DEFAULT_DECODE_STEP_S
    measured = ReplayCluster(msgspec.structs.replace(SPEC, speed_seeds="measured"))
    assert measured.speeds.prefill_tokens_per_s > 1000
    assert 0.001 < measured.speeds.decode_step_s < 1.0
    assert len(measured.targets) == SPEC.servers * SPEC.dp_size
    with pytest.raises(ValueError, match="speed_seeds"):
        ReplayCluster(msgspec.structs.replace(SPEC, speed_seeds="guess"))


def test_replicas_spread_requests_in_turn_and_finish_on_the_replica_that_routed() -> None:
    cluster = ReplayCluster(SPEC)
    router = make_router("x3:sglang_cache_aware", cluster)
    assert router.name == "x3:sglang_cache_aware(reimpl)"
    records = asyncio.run(replay(_shared_prefix(), cluster, router))
    assert len(records) == 48 and all(r.finish_s is not None for r in records)
    # Every replica saw a third of the requests and released every one of them.
    replicas = router._replicas  # type: ignore[attr-defined]
    for replica in replicas:
        assert sum(replica.policy.load.values()) == 0
        assert replica.policy.cache_hit_decisions + replica.policy.imbalanced_decisions <= 16
    shared_cluster = ReplayCluster(SPEC)
    shared = make_router("shared3:prefix_aware", shared_cluster)
    assert shared.name == "shared3:prefix_aware"
    shared_records = asyncio.run(replay(_shared_prefix(), shared_cluster, shared))
    assert len(shared_records) == 48 and all(r.finish_s is not None for r in shared_records)
