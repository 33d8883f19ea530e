"""The performance model against the deployment study's measurements (simulated by stepping the engine).

Every number here is asserted through ``RankEngine.step()`` durations in virtual time, so what the simulator
serves is what is calibrated. docs/simulator.md explains how the constants produce each figure.
"""

from __future__ import annotations

import statistics

import pytest

from backends.sim.engine import (
    DEEPSEEK_V3,
    EngineConfig,
    RequestTiming,
    ServerEngine,
    SimRequest,
    run_closed_loop,
    run_closed_loop_server,
)


def request_factory(prompt_tokens: int, output_tokens: int, tag: str = "r"):  # type: ignore[no-untyped-def]
    def make(i: int) -> SimRequest:
        ids = [1000 + (i * 7919 + j * 31) % 90_000 for j in range(prompt_tokens)]
        return SimRequest(f"{tag}{i}", ids, output_tokens, ignore_eos=True)

    return make


def single_user(preset: str, *, mtp: bool = False, rtt_ms: float | None = None) -> list[RequestTiming]:
    engine = ServerEngine(EngineConfig(preset=preset, mtp=mtp, rtt_ms=rtt_ms))
    return run_closed_loop(engine.ranks[0], request_factory(1000, 256), concurrency=1, total_requests=3)


def decode_speed(timings: list[RequestTiming]) -> float:
    return statistics.mean(t.decode_tokens_per_s for t in timings)


def test_model_sizes_are_deepseek_v3() -> None:
    assert DEEPSEEK_V3.total_params == pytest.approx(671e9, rel=0.005)
    assert DEEPSEEK_V3.active_params == pytest.approx(37e9, rel=0.02)
    assert DEEPSEEK_V3.kv_bytes_per_token() == 576 * 61 * 2
    assert DEEPSEEK_V3.distinct_experts(1) == pytest.approx(8)
    assert DEEPSEEK_V3.distinct_experts(128) > 250


def test_single_user_decode_on_h200_tp8_is_about_50_tokens_per_s() -> None:
    assert decode_speed(single_user("h200-tp8")) == pytest.approx(50.0, rel=0.10)


@pytest.mark.parametrize(("rtt_ms", "measured"), [(0.193, 18.9), (2.193, 4.85)])
def test_tp16_across_two_h20_nodes_collapses_with_rtt(rtt_ms: float, measured: float) -> None:
    assert decode_speed(single_user("h20-tp16", rtt_ms=rtt_ms)) == pytest.approx(measured, rel=0.10)


def test_h20_default_rtt_is_the_studys_0_193_ms() -> None:
    assert ServerEngine(EngineConfig(preset="h20-tp16")).rtt_ms == pytest.approx(0.193)


def test_mtp_is_about_1_8x_faster_for_one_user() -> None:
    ratio = decode_speed(single_user("h200-tp8", mtp=True)) / decode_speed(single_user("h200-tp8"))
    assert 1.6 <= ratio <= 2.0


def test_mtp_loses_on_throughput_and_ttft_at_concurrency_128() -> None:
    results = {}
    for mtp in (False, True):
        engine = ServerEngine(EngineConfig(preset="h200-tp8", mtp=mtp))
        timings = run_closed_loop(
            engine.ranks[0], request_factory(1000, 128), concurrency=128, total_requests=384
        )
        makespan = max(t.finished_s or 0.0 for t in timings)
        throughput = sum(t.completion_tokens for t in timings) / makespan
        results[mtp] = (throughput, statistics.mean(t.ttft_s for t in timings))
    assert results[True][0] < results[False][0]
    assert results[True][1] > results[False][1]


def test_batching_multiplies_throughput_but_not_beyond_bandwidth() -> None:
    engine = ServerEngine(EngineConfig(preset="h200-tp8"))
    one = engine.nominal_decode_step_s(1)
    many = engine.nominal_decode_step_s(64)
    assert one < many < 4 * one  # 64 users cost < 4 single-user steps: decode is bandwidth bound
    assert 64 / many > 20 * (1 / one)


@pytest.mark.parametrize(
    ("preset", "low", "high"), [("h200-tp8", 20_000, 50_000), ("h20-tp16", 6_000, 20_000)]
)
def test_prefill_throughput_matches_the_flops_derivation(preset: str, low: float, high: float) -> None:
    engine = ServerEngine(EngineConfig(preset=preset))
    timings = run_closed_loop(
        engine.ranks[0], request_factory(8192, 1, "p"), concurrency=4, total_requests=16
    )
    makespan = max(t.finished_s or 0.0 for t in timings)
    assert low <= 16 * 8192 / makespan <= high


def test_prefix_cache_hit_cuts_time_to_first_token() -> None:
    engine = ServerEngine(EngineConfig(preset="h200-tp8"))
    rank = engine.ranks[0]
    cold = run_closed_loop(rank, request_factory(8000, 1, "c"), concurrency=1, total_requests=1)[0]
    warm = run_closed_loop(rank, request_factory(8000, 1, "w"), concurrency=1, total_requests=1)[0]
    assert warm.cached_tokens == 7999
    assert warm.ttft_s < cold.ttft_s / 3


@pytest.mark.parametrize(
    ("preset", "mtp", "low", "high"),
    [
        ("h200-tp8", False, 500_000, 700_000),
        ("h200-dp8", False, 380_000, 560_000),
        ("h20-tp16", False, 500_000, 720_000),
        ("h200-tp8", True, 480_000, 680_000),
    ],
)
def test_kv_capacity_derives_from_hbm_weights_and_mla_bytes(
    preset: str, mtp: bool, low: int, high: int
) -> None:
    engine = ServerEngine(EngineConfig(preset=preset, mtp=mtp))
    assert low <= engine.max_total_num_tokens <= high
    expected = int(engine.kv_cache_bytes_per_gpu // engine.perf.kv_bytes_per_token)
    assert engine.max_total_num_tokens == expected


def test_dp_attention_ranks_share_moe_time() -> None:
    engine = ServerEngine(EngineConfig(preset="h200-dp8"))
    lone = engine.ranks[0]
    lone.add(SimRequest("a", list(range(100, 400)), 50, ignore_eos=True))
    lone.step()
    alone = lone.step().duration_s
    for rank in engine.ranks[1:]:
        for j in range(32):
            rank.add(SimRequest(f"o{rank.dp_rank}-{j}", list(range(500 + j, 800 + j)), 50, ignore_eos=True))
        rank.step()
        rank.step()
    crowded = lone.step().duration_s
    assert crowded > alone * 1.2  # the other ranks' tokens touch more experts in the shared MoE layers


def test_dp_attention_serves_many_long_context_users_faster_than_tp8() -> None:
    # 256 users with 4k-token prompts: TP8 replicates every request's MLA cache on all 8 GPUs (0.6 M tokens in
    # all, so it retracts and queues), DP attention gives each rank its own cache (8 x 0.47 M tokens).
    results = {}
    for preset in ("h200-tp8", "h200-dp8"):
        engine = ServerEngine(EngineConfig(preset=preset))
        timings = run_closed_loop_server(
            engine, request_factory(4000, 512), concurrency=256, total_requests=256
        )
        makespan = max(t.finished_s or 0.0 for t in timings)
        results[preset] = sum(t.completion_tokens for t in timings) / makespan
    assert results["h200-dp8"] > 1.3 * results["h200-tp8"]


def test_server_level_virtual_runs_are_deterministic() -> None:
    def run() -> list[tuple[str, float | None, int]]:
        engine = ServerEngine(EngineConfig(preset="h200-dp8", seed=5))
        timings = run_closed_loop_server(engine, request_factory(700, 40), concurrency=24, total_requests=48)
        return [(t.rid, t.finished_s, t.completion_tokens) for t in timings]

    assert run() == run()
