"""The per-rank scheduler: FCFS, max running, chunked prefill, cache accounting, aborts, flush, memory."""

from __future__ import annotations

import random

import pytest

from backends.sim.engine import (
    EngineConfig,
    Event,
    RankEngine,
    RequestFinished,
    RequestScheduled,
    ServerEngine,
    SimRequest,
    StepResult,
    Tokenizer,
    TokensGenerated,
)


def make_rank(**overrides: object) -> RankEngine:
    config = EngineConfig(preset="h200-tp8", **overrides)  # type: ignore[arg-type]
    return ServerEngine(config).ranks[0]


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 100_000) for _ in range(length)]


def drain(rank: RankEngine, max_steps: int = 100_000) -> list[StepResult]:
    results: list[StepResult] = []
    for _ in range(max_steps):
        if not rank.has_work():
            return results
        results.append(rank.step())
    raise AssertionError("rank did not drain")


def events_of(results: list[StepResult]) -> list[Event]:
    return [e for r in results for e in r.events]


def finished(results: list[StepResult]) -> dict[str, RequestFinished]:
    return {e.rid: e for e in events_of(results) if isinstance(e, RequestFinished)}


def test_waiting_queue_is_fcfs_and_bounded_by_max_running() -> None:
    rank = make_rank(max_running_requests=2)
    for i in range(4):
        rank.add(SimRequest(f"r{i}", prompt(i, 100), 5 + i, ignore_eos=True))
    first = rank.step()
    assert [e.rid for e in first.events if isinstance(e, RequestScheduled)] == ["r0", "r1"]
    assert rank.load().num_running_reqs == 2 and rank.load().num_waiting_reqs == 2
    order = [e.rid for e in events_of(drain(rank)) if isinstance(e, RequestScheduled)]
    assert order == ["r2", "r3"]


def test_long_prompt_is_prefilled_in_chunks_and_pauses_decoding() -> None:
    rank = make_rank(chunked_prefill_size=1024)
    rank.add(SimRequest("short", prompt(1, 50), 200, ignore_eos=True))
    rank.step()  # prefill of the short request
    rank.step()  # one decode step
    rank.add(SimRequest("long", prompt(2, 3000), 5, ignore_eos=True))
    chunk_steps = [rank.step() for _ in range(3)]
    for result in chunk_steps:
        # A prefill step only: the running request gets no token while the long prompt is chunked.
        assert not [e for e in result.events if isinstance(e, TokensGenerated) and e.rid == "short"]
    long_tokens = [
        e for r in chunk_steps for e in r.events if isinstance(e, TokensGenerated) and e.rid == "long"
    ]
    assert len(long_tokens) == 1 and long_tokens[0] in chunk_steps[2].events
    next_step = rank.step()
    assert {e.rid for e in next_step.events if isinstance(e, TokensGenerated)} == {"short", "long"}


def test_chunk_time_grows_with_chunk_tokens() -> None:
    rank = make_rank(chunked_prefill_size=2048)
    rank.add(SimRequest("a", prompt(3, 4096 + 1000), 1, ignore_eos=True))
    durations = [r.duration_s for r in drain(rank)]
    assert len(durations) == 3
    assert (
        durations[2] < durations[0] < durations[1]
    )  # last chunk is short; second attends to a longer prefix


@pytest.mark.parametrize(("page_size", "expected"), [(1, 999), (64, 960), (16, 992)])
def test_cached_tokens_follow_sglang_rules(page_size: int, expected: int) -> None:
    rank = make_rank(page_size=page_size)
    ids = prompt(4, 1000)
    rank.add(SimRequest("first", ids, 3, ignore_eos=True))
    assert finished(drain(rank))["first"].cached_tokens == 0
    rank.add(SimRequest("again", ids, 3, ignore_eos=True))
    # The match is capped at input_len - 1 and truncated to a whole number of pages.
    assert finished(drain(rank))["again"].cached_tokens == expected


def test_partial_prefix_and_generated_output_are_cached() -> None:
    rank = make_rank()
    base = prompt(5, 500)
    rank.add(SimRequest("a", base, 20, ignore_eos=True))
    results = drain(rank)
    output = [t for e in events_of(results) if isinstance(e, TokensGenerated) for t in e.token_ids]
    follow_up = [*base, *output, *prompt(6, 30)]
    rank.add(SimRequest("b", follow_up, 2, ignore_eos=True))
    # Prompt plus every output token but the last (whose KV was never computed) is reusable.
    assert finished(drain(rank))["b"].cached_tokens == 500 + 20 - 1


def test_disabled_radix_cache_never_hits() -> None:
    rank = make_rank(disable_radix_cache=True)
    ids = prompt(7, 300)
    for rid in ("a", "b"):
        rank.add(SimRequest(rid, ids, 2, ignore_eos=True))
        assert finished(drain(rank))[rid].cached_tokens == 0


def test_abort_waiting_and_running_requests_frees_everything() -> None:
    rank = make_rank(max_running_requests=1)
    rank.add(SimRequest("run", prompt(8, 200), 100, ignore_eos=True))
    rank.add(SimRequest("wait", prompt(9, 200), 100, ignore_eos=True))
    rank.step()
    assert rank.abort("wait") and rank.abort("run")
    assert not rank.abort("run") and not rank.abort("never-seen")
    events = rank.step().events
    aborts = {e.rid: e for e in events if isinstance(e, RequestFinished)}
    assert set(aborts) == {"run", "wait"}
    assert aborts["run"].finish.to_sglang()["type"] == "abort"
    assert aborts["run"].completion_tokens == 1
    assert not rank.has_work()
    assert rank.load().num_used_tokens == 0


def test_flush_cache_is_refused_while_requests_run() -> None:
    rank = make_rank()
    ids = prompt(10, 300)
    rank.add(SimRequest("a", ids, 50, ignore_eos=True))
    rank.step()
    assert rank.flush_cache() is False
    drain(rank)
    assert rank.flush_cache() is True
    assert rank.occupied_kv_tokens == 0
    rank.add(SimRequest("b", ids, 2, ignore_eos=True))
    assert finished(drain(rank))["b"].cached_tokens == 0


def test_kv_capacity_is_never_exceeded_and_everyone_finishes() -> None:
    rng = random.Random(11)
    rank = make_rank(max_total_num_tokens=6000, chunked_prefill_size=512, page_size=4)
    shared = prompt(12, 800)
    expected: dict[str, int] = {}
    for i in range(60):
        ids = (shared if rng.random() < 0.5 else []) + prompt(100 + i, rng.randrange(20, 1500))
        max_new = rng.randrange(1, 400)
        expected[f"r{i}"] = max_new
        rank.add(SimRequest(f"r{i}", ids, max_new, ignore_eos=True))
    results = []
    while rank.has_work():
        results.append(rank.step())
        assert rank.occupied_kv_tokens <= rank.max_total_num_tokens
        assert rank.load().num_used_tokens <= rank.max_total_num_tokens
        assert len(results) < 200_000
    done = finished(results)
    assert {rid: f.completion_tokens for rid, f in done.items()} == expected
    assert all(f.finish.type == "length" for f in done.values())
    assert rank.num_retractions > 0  # the workload was tight enough to force retractions
    generated: dict[str, int] = {}
    for event in events_of(results):
        if isinstance(event, TokensGenerated):
            generated[event.rid] = generated.get(event.rid, 0) + len(event.token_ids)
    assert generated == expected  # retraction never re-emits or loses tokens


def test_too_long_input_is_aborted_like_sglang() -> None:
    rank = make_rank(max_total_num_tokens=1000)
    rank.add(SimRequest("big", prompt(13, 2000), 5))
    done = finished(drain(rank))["big"]
    assert done.finish.type == "abort" and "exceeds the maximum allowed length" in (done.finish.message or "")


def test_max_new_tokens_is_capped_by_context_length() -> None:
    rank = make_rank(context_length=300)
    rank.add(SimRequest("a", prompt(14, 250), 1000, ignore_eos=True))
    # SGLang: max_new_tokens <= context_len - 1 - input_len - 1
    assert finished(drain(rank))["a"].completion_tokens == 300 - 1 - 250 - 1


def test_duplicate_rid_and_bad_input_are_rejected() -> None:
    rank = make_rank()
    rank.add(SimRequest("x", [1, 2, 3], 1))
    with pytest.raises(ValueError, match="Duplicate request ID"):
        rank.add(SimRequest("x", [1, 2, 3], 1))
    with pytest.raises(ValueError):
        rank.add(SimRequest("y", [], 1))
    with pytest.raises(ValueError):
        rank.add(SimRequest("z", [1], -1))


def test_stop_token_ids_stop_strings_and_natural_eos() -> None:
    rank = make_rank()
    ids = prompt(15, 40)
    rank.add(SimRequest("free", ids, 5000))
    free = drain(rank)
    tokens = [t for e in events_of(free) if isinstance(e, TokensGenerated) for t in e.token_ids]
    done = finished(free)["free"]
    assert done.finish.to_sglang() == {"type": "stop", "matched": 1}  # EOS at the natural length
    assert tokens[-1] == 1 and done.completion_tokens == len(tokens)

    rank.add(SimRequest("tok", ids, 5000, stop_token_ids=(tokens[3],)))
    stopped = finished(drain(rank))["tok"]
    assert stopped.finish.to_sglang() == {"type": "stop", "matched": tokens[3]}
    assert stopped.completion_tokens == tokens.index(tokens[3]) + 1

    word = rank_text(tokens[6])
    rank.add(SimRequest("str", ids, 5000, stop_strings=(word,)))
    assert finished(drain(rank))["str"].finish.to_sglang() == {"type": "stop", "matched": word}


def rank_text(token_id: int) -> str:
    return Tokenizer().decode([token_id])


def test_ignore_eos_runs_to_max_new_tokens() -> None:
    rank = make_rank()
    rank.add(SimRequest("a", prompt(16, 40), 3000, ignore_eos=True))
    assert finished(drain(rank))["a"].finish.to_sglang() == {"type": "length", "length": 3000}


def test_same_seed_same_everything_and_other_seed_other_text() -> None:
    def run(seed: int) -> list[tuple[str, object]]:
        rank = ServerEngine(EngineConfig(preset="h200-tp8", mtp=True, seed=seed)).ranks[0]
        for i in range(6):
            rank.add(SimRequest(f"r{i}", prompt(i % 3, 300), 60))
        return [(type(e).__name__, e) for r in drain(rank) for e in [*r.events, r.duration_s]]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_load_reports_queue_and_usage() -> None:
    rank = make_rank(max_running_requests=1)
    rank.add(SimRequest("a", prompt(17, 400), 10, ignore_eos=True))
    rank.add(SimRequest("b", prompt(18, 300), 10, ignore_eos=True))
    before = rank.load()
    assert before.num_waiting_reqs == 2 and before.num_waiting_uncached_tokens == 700
    rank.step()
    during = rank.load()
    assert during.num_running_reqs == 1 and during.num_waiting_reqs == 1
    assert during.num_used_tokens >= 400 and 0 < during.token_usage < 1
    drain(rank)
    after = rank.load()
    assert after.num_used_tokens == 0 and after.gen_throughput > 0


def test_dp_server_has_ranks_picked_round_robin() -> None:
    engine = ServerEngine(EngineConfig(preset="h200-dp8"))
    assert len(engine.ranks) == 8 and engine.enable_dp_attention
    assert [engine.pick_rank() for _ in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    with pytest.raises(ValueError):
        ServerEngine(EngineConfig(preset="h200-tp8", dp_size=3))
    with pytest.raises(ValueError, match="unknown preset"):
        ServerEngine(EngineConfig(preset="a100"))


def test_a_lone_request_that_cannot_grow_is_ended_cleanly() -> None:
    # Only reachable when the pool is smaller than SGLang's own length caps allow; the rank must not spin.
    rank = make_rank(max_total_num_tokens=64, context_length=10_000)
    rank.add(SimRequest("a", prompt(19, 40), 100, ignore_eos=True))
    done = finished(drain(rank))["a"]
    assert done.finish.type == "length"  # capped at max_req_len - input - 1, so it fits after all
    assert done.completion_tokens == 64 - 1 - 40 - 1


def test_mtp_near_a_full_pool_still_finishes_by_length() -> None:
    rank = make_rank(mtp=True, max_total_num_tokens=64, context_length=10_000)
    rank.add(SimRequest("a", prompt(20, 40), 100, ignore_eos=True))
    done = finished(drain(rank))["a"]
    assert done.finish.to_sglang() == {"type": "length", "length": 64 - 1 - 40 - 1}


def test_dp_attention_divides_the_chunk_like_sglang() -> None:
    assert ServerEngine(EngineConfig(preset="h200-dp8")).chunked_prefill_size == 1024
    assert (
        ServerEngine(EngineConfig(preset="h200-dp8", chunked_prefill_size=16384)).chunked_prefill_size == 2048
    )
    assert (
        ServerEngine(EngineConfig(preset="h200-tp8", chunked_prefill_size=16384)).chunked_prefill_size
        == 16384
    )
    assert ServerEngine(EngineConfig(preset="h200-tp8", chunked_prefill_size=-1)).chunked_prefill_size is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"page_size": 0},
        {"rtt_ms": -1.0},
        {"chunked_prefill_size": 8, "page_size": 64},
        {"max_running_requests": 0},
        {"max_total_num_tokens": 4},
        {"schedule_conservativeness": -0.5},
        {"context_length": 1},
    ],
)
def test_bad_configs_are_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ServerEngine(EngineConfig(**overrides))  # type: ignore[arg-type]
