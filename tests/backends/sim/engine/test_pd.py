"""PD disaggregation: a prefill server answers after one token; a decode server skips prefill compute,
models the KV transfer, and continues the exact answer a regular server would give."""

from __future__ import annotations

from backends.sim.engine import (
    EngineConfig,
    PrefilledKV,
    RankEngine,
    RequestFinished,
    RequestScheduled,
    ServerEngine,
    SimRequest,
    StepResult,
    TokensGenerated,
)

PROMPT = [1000 + (j * 37) % 50_000 for j in range(4000)]


def drain(rank: RankEngine) -> list[StepResult]:
    results = []
    while rank.has_work():
        results.append(rank.step())
        assert len(results) < 100_000
    return results


def tokens(results: list[StepResult], rid: str) -> list[int]:
    return [
        t
        for r in results
        for e in r.events
        if isinstance(e, TokensGenerated) and e.rid == rid
        for t in e.token_ids
    ]


def finish(results: list[StepResult], rid: str) -> RequestFinished:
    return next(e for r in results for e in r.events if isinstance(e, RequestFinished) and e.rid == rid)


def test_prefill_mode_generates_one_token_and_reports_length_zero() -> None:
    rank = ServerEngine(EngineConfig(disaggregation_mode="prefill")).ranks[0]
    rank.add(SimRequest("p", PROMPT, 300))
    results = drain(rank)
    done = finish(results, "p")
    assert done.finish.to_sglang() == {"type": "length", "length": 0}
    assert done.completion_tokens == 1 and len(tokens(results, "p")) == 1
    rank.add(SimRequest("p2", PROMPT, 300))
    assert finish(drain(rank), "p2").cached_tokens == len(PROMPT) - 1  # prefill servers keep a radix cache


def test_decode_mode_continues_the_regular_answer_after_transfer() -> None:
    regular = ServerEngine(EngineConfig()).ranks[0]
    regular.add(SimRequest("r", PROMPT, 50, ignore_eos=True))
    regular_results = drain(regular)
    expected = tokens(regular_results, "r")

    prefill = ServerEngine(EngineConfig(disaggregation_mode="prefill")).ranks[0]
    prefill.add(SimRequest("r", PROMPT, 50, ignore_eos=True))
    prefill_results = drain(prefill)
    first = tokens(prefill_results, "r")[0]
    prefill_time = sum(r.duration_s for r in prefill_results)

    decode_engine = ServerEngine(EngineConfig(disaggregation_mode="decode"))
    decode = decode_engine.ranks[0]
    kv = PrefilledKV(first_token_id=first, cached_tokens=123, kv_tokens=len(PROMPT))
    decode.add(SimRequest("r", PROMPT, 50, ignore_eos=True, prefilled=kv))
    results = drain(decode)
    scheduled = next(e for r in results for e in r.events if isinstance(e, RequestScheduled))
    assert scheduled.cached_tokens == 123
    assert tokens(results, "r") == expected
    done = finish(results, "r")
    assert done.completion_tokens == 50 and done.cached_tokens == 123

    # Time to the first token on the decode side is the KV transfer: bytes over the NIC, not prefill compute.
    transfer = decode_engine.perf.kv_transfer_time(len(PROMPT))
    first_token_at = 0.0
    for result in results:
        first_token_at += result.duration_s
        if any(isinstance(e, TokensGenerated) for e in result.events):
            break
    assert abs(first_token_at - transfer) < 1e-9
    assert transfer < prefill_time
    expected_bytes = len(PROMPT) * 576 * 61 * 2
    assert abs(transfer - (1e-3 + expected_bytes / 50e9)) < 1e-9


def test_decode_mode_transfers_share_the_link_and_count_as_running() -> None:
    engine = ServerEngine(EngineConfig(disaggregation_mode="decode"))
    rank = engine.ranks[0]
    for i in range(3):
        kv = PrefilledKV(first_token_id=500, cached_tokens=0, kv_tokens=len(PROMPT))
        rank.add(SimRequest(f"d{i}", PROMPT, 1, prefilled=kv))
    first = rank.step()
    assert first.duration_s > 0
    assert (
        rank.load().num_running_reqs + len([e for e in first.events if isinstance(e, RequestFinished)]) == 3
    )
    results = [first, *drain(rank)]
    ends: list[float] = []
    clock = 0.0
    for result in results:
        clock += result.duration_s
        ends.extend(clock for e in result.events if isinstance(e, RequestFinished))
    one = engine.perf.kv_transfer_time(len(PROMPT))
    assert [round(t / one, 6) for t in ends] == [1.0, 2.0, 3.0]  # one NIC: transfers queue behind each other
    assert all(
        finish(results, f"d{i}").finish.to_sglang() == {"type": "length", "length": 1} for i in range(3)
    )


def test_decode_mode_has_no_radix_cache() -> None:
    rank = ServerEngine(EngineConfig(disaggregation_mode="decode")).ranks[0]
    for rid in ("a", "b"):
        kv = PrefilledKV(first_token_id=500, cached_tokens=7, kv_tokens=len(PROMPT))
        rank.add(SimRequest(rid, PROMPT, 3, ignore_eos=True, prefilled=kv))
        drain(rank)
    assert rank.tree.total_size == 0 and rank.occupied_kv_tokens == 0
