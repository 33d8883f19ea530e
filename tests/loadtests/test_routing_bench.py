from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from loadtests.routing_bench.client import run_open_loop
from loadtests.routing_bench.metrics import _parse
from loadtests.workloads import BenchRequest


async def _start_fake_server(
    delay_first_s: float, chunks: int
) -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    """A streaming OpenAI-style endpoint: a role-only chunk, then ``chunks`` content chunks, then usage."""
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({"body": body, "at": time.perf_counter()})
        if body.get("max_tokens") == 999:
            return web.json_response({"error": {"message": "bad"}}, status=400)
        headers = {
            "content-type": "text/event-stream",
            "x-cachet-worker": "http://w1",
            "x-cachet-cached-tokens": "50",
            "x-cachet-dp-rank": "1",
        }
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n')
        await asyncio.sleep(delay_first_s)
        for i in range(chunks):
            payload = {"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]}
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())
            await asyncio.sleep(0.005)
        usage = {"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": chunks,
                                          "prompt_tokens_details": {"cached_tokens": 60}}}  # fmt: skip
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", seen


def _chat(
    rid: str, at: float, *, after: str | None = None, think_s: float = 0.0, max_tokens: int = 5
) -> BenchRequest:
    return BenchRequest(rid=rid, arrival_s=at, max_tokens=max_tokens, after=after, think_s=think_s,
                        messages=[{"role": "user", "content": "hi"}])  # fmt: skip


async def test_open_loop_client_measures_ttft_tpot_usage_and_chains_rounds() -> None:
    runner, url, seen = await _start_fake_server(delay_first_s=0.1, chunks=5)
    try:
        requests = [
            _chat("a", 0.0),
            _chat("b", 0.05),
            _chat("a2", 0.0, after="a", think_s=0.2),
            _chat("bad", 0.1, max_tokens=999),
            _chat("after-bad", 0.0, after="bad"),
        ]
        records = {r.rid: r for r in await run_open_loop(requests, [url], model="m")}
    finally:
        await runner.cleanup()
    assert set(records) == {"a", "b", "a2", "bad"}  # the chat stops after a failed round
    a, a2 = records["a"], records["a2"]
    assert a.error is None and a.status == 200
    assert a.ttft_s is not None and 0.09 < a.ttft_s < 1.0  # the role-only chunk does not count
    assert a.prompt_tokens == 100 and a.cached_tokens == 60 and a.completion_tokens == 5
    assert a.tpot_s is not None and 0 < a.tpot_s < 0.1
    assert a.target == "http://w1@1"
    assert a.predicted_cached_tokens == 50
    assert a.finish_s is not None and a2.arrival_s >= a.finish_s + 0.2 - 0.01
    assert records["b"].arrival_s >= 0.045
    assert records["bad"].status == 400 and records["bad"].error is not None and "bad" in records["bad"].error
    sent = [s["body"] for s in seen]
    assert all(b["stream"] is True and b["ignore_eos"] is True and b["model"] == "m" for b in sent)
    assert all(b["stream_options"] == {"include_usage": True} for b in sent)


async def test_open_loop_client_spreads_over_entries_and_respects_deadline() -> None:
    one, url1, seen1 = await _start_fake_server(delay_first_s=0.0, chunks=1)
    two, url2, seen2 = await _start_fake_server(delay_first_s=0.0, chunks=1)
    try:
        requests = [_chat(f"r{i}", 0.01 * i) for i in range(6)] + [_chat("late", 5.0)]
        records = await run_open_loop(requests, [url1, url2], model="m", deadline_s=1.0)
    finally:
        await one.cleanup()
        await two.cleanup()
    assert len(records) == 6 and len(seen1) == 3 and len(seen2) == 3


def test_metrics_parser_sums_counters_over_labels_and_takes_the_total_cache_source() -> None:
    text = "\n".join([
        "# TYPE sglang:num_requests_total counter",
        'sglang:num_requests_total{model_name="m"} 5.0',
        'sglang:prompt_tokens_total{model_name="m"} 1000.0',
        'sglang:cached_tokens_total{model_name="m",cache_source="device"} 300.0',
        'sglang:cached_tokens_total{model_name="m",cache_source="total"} 400.0',
        'sglang:num_running_reqs{dp_rank="0"} 3.0',
    ])  # fmt: skip
    assert _parse(text) == {
        "sglang:num_requests_total": 5.0,
        "sglang:prompt_tokens_total": 1000.0,
        "sglang:cached_tokens_total": 400.0,
    }
