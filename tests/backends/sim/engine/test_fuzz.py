"""Random interleavings of add / abort / flush / step never break the engine's invariants."""

from __future__ import annotations

import random

import pytest

from backends.sim.engine import (
    EngineConfig,
    PrefilledKV,
    RequestFinished,
    RequestScheduled,
    ServerEngine,
    SimRequest,
    TokensGenerated,
)


@pytest.mark.parametrize(
    ("mode", "mtp", "page_size", "seed"),
    [("null", False, 1, 1), ("null", True, 16, 2), ("prefill", False, 4, 3), ("decode", True, 1, 4)],
)
def test_random_operations_keep_invariants(mode: str, mtp: bool, page_size: int, seed: int) -> None:
    rng = random.Random(seed)
    config = EngineConfig(
        mtp=mtp,
        page_size=page_size,
        max_total_num_tokens=8192,
        chunked_prefill_size=1024,
        max_running_requests=12,
        disaggregation_mode=mode,  # type: ignore[arg-type]
        seed=seed,
    )
    rank = ServerEngine(config).ranks[0]
    prefixes = [[rng.randrange(3, 90_000) for _ in range(rng.randrange(50, 2000))] for _ in range(4)]
    live: set[str] = set()
    finished: set[str] = set()
    emitted: dict[str, int] = {}
    for op in range(3000):
        roll = rng.random()
        if roll < 0.25:
            rid = f"r{op}"
            ids = rng.choice(prefixes)[: rng.randrange(1, 2000)] + [
                rng.randrange(3, 90_000) for _ in range(5)
            ]
            prefilled = None
            if mode == "decode" and rng.random() < 0.8:
                prefilled = PrefilledKV(
                    first_token_id=rng.randrange(500, 5000), cached_tokens=3, kv_tokens=len(ids)
                )
            rank.add(
                SimRequest(
                    rid, ids, rng.randrange(0, 300), ignore_eos=rng.random() < 0.5, prefilled=prefilled
                )
            )
            live.add(rid)
        elif roll < 0.30 and live:
            rid = rng.choice(sorted(live))
            assert rank.abort(rid) in (True, False)
        elif roll < 0.32:
            rank.flush_cache()
        elif rank.has_work():
            result = rank.step()
            assert result.duration_s >= 0
            for event in result.events:
                assert event.rid not in finished, "no event after a request finished"
                if isinstance(event, TokensGenerated):
                    assert event.token_ids
                    emitted[event.rid] = emitted.get(event.rid, 0) + len(event.token_ids)
                elif isinstance(event, RequestFinished):
                    finished.add(event.rid)
                    live.discard(event.rid)
                    if event.finish.type != "abort":
                        assert event.completion_tokens == emitted.get(event.rid, 0)
                else:
                    assert isinstance(event, RequestScheduled)
        assert rank.occupied_kv_tokens <= rank.max_total_num_tokens
        assert rank.load().num_used_tokens <= rank.max_total_num_tokens
    for _ in range(200_000):
        if not rank.has_work():
            break
        for event in rank.step().events:
            if isinstance(event, RequestFinished):
                live.discard(event.rid)
    assert not live and not rank.has_work()
    assert rank.load().num_used_tokens == 0
    assert rank.flush_cache() and rank.occupied_kv_tokens == 0
