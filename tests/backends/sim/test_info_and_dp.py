"""Health, info, load and metrics endpoints; DP pinning and round robin; behaviour by SGLang version."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from backends.sim import SimServer, resolve_version

from .conftest import StartServer

LOAD_KEYS = [
    "timestamp",
    "dp_rank",
    "num_running_reqs",
    "num_waiting_reqs",
    "num_waiting_uncached_tokens",
    "num_used_tokens",
    "num_total_tokens",
    "max_total_num_tokens",
    "max_running_requests",
    "token_usage",
    "gen_throughput",
    "cache_hit_rate",
    "utilization",
]


async def test_health_503_while_starting_then_200_empty(start_server: StartServer) -> None:
    server = await start_server(startup_delay_s=0.5, wait=False)
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.get("/health")
        assert r.status_code == 503 and r.content == b""
        await server.wait_ready(10)
        for path in ("/health", "/health_generate"):
            r = await c.get(path)
            assert r.status_code == 200 and r.content == b"" and "content-type" not in r.headers


async def test_server_info_fields(client: httpx.AsyncClient, server: SimServer) -> None:
    for path in ("/server_info", "/get_server_info"):
        info = (await client.get(path)).json()
        for key in (
            "model_path",
            "served_model_name",
            "tp_size",
            "dp_size",
            "enable_dp_attention",
            "page_size",
            "max_total_num_tokens",
            "max_running_requests",
            "max_prefill_tokens",
            "disaggregation_mode",
            "disaggregation_bootstrap_port",
            "load_balance_method",
            "max_total_tokens",
        ):
            assert key in info, key
        assert info["status"] == "ready" and info["version"] == "0.5.15"
        assert info["dp_size"] == 2 and info["enable_dp_attention"] is True
        assert info["disaggregation_mode"] == "null"
        assert len(info["internal_states"]) == 2
        assert "memory_usage" in info["internal_states"][0]
        assert info["kv_events"] is None
        assert list(info)[-2:] == ["version", "kv_events"]


async def test_model_info(client: httpx.AsyncClient) -> None:
    for path in ("/model_info", "/get_model_info"):
        body = (await client.get(path)).json()
        assert list(body) == [
            "model_path",
            "tokenizer_path",
            "is_generation",
            "preferred_sampling_params",
            "weight_version",
            "has_image_understanding",
            "has_audio_understanding",
            "model_type",
            "architectures",
        ]


async def test_v1_loads_shape_and_filters(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/loads")).json()
    assert list(body) == ["timestamp", "version", "loads"]
    assert [entry["dp_rank"] for entry in body["loads"]] == [0, 1]
    entry = body["loads"][0]
    assert list(entry)[: len(LOAD_KEYS)] == LOAD_KEYS
    assert {"memory", "disaggregation", "queues"} <= set(entry)
    core = (await client.get("/v1/loads", params={"include": "core", "dp_rank": 1})).json()
    assert [list(e) for e in core["loads"]] == [LOAD_KEYS]
    assert core["loads"][0]["dp_rank"] == 1
    queues = (await client.get("/v1/loads", params={"include": "queues"})).json()
    assert "queues" in queues["loads"][0] and "memory" not in queues["loads"][0]
    bad = await client.get("/v1/loads", params={"include": "bogus"})
    assert bad.status_code == 500 and bad.text == "Internal Server Error"
    prom = await client.get("/v1/loads", params={"format": "prometheus"})
    assert 'sglang_num_running_reqs{dp_rank="1"} 0' in prom.text


async def test_get_load_and_v1_loads_by_version(start_server: StartServer) -> None:
    expectations = {
        "0.5.0": ({"load"}, False, False),
        "0.5.10": ({"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}, True, True),
        "0.5.15": (
            {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens", "num_pending_tokens", "ts_tic"},
            True,
            False,
        ),
    }
    for version, (keys, has_loads, aggregate) in expectations.items():
        server = await start_server(sglang_version=version, dp_size=2)
        async with httpx.AsyncClient(base_url=server.url) as c:
            load = (await c.get("/get_load")).json()
            got = set(load) if isinstance(load, dict) else set(load[0])
            assert got == keys, version
            if isinstance(load, list):
                assert [x["dp_rank"] for x in load] == [0, 1]
            r = await c.get("/v1/loads")
            assert (r.status_code == 200) == has_loads, version
            if has_loads:
                assert ("aggregate" in r.json()) == aggregate, version
                assert ("dp_rank_count" in r.json()) == aggregate, version
            assert (await c.get("/server_info")).status_code == (200 if version != "0.5.0" else 404)
            assert (await c.get("/get_server_info")).status_code == 200


async def test_round_robin_spreads_over_ranks(start_server: StartServer) -> None:
    server = await start_server(dp_size=4)
    async with httpx.AsyncClient(base_url=server.url) as c:
        ranks = [
            (await c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})).json()[
                "meta_info"
            ]["dp_rank"]
            for _ in range(8)
        ]
    assert sorted(set(ranks)) == [0, 1, 2, 3]


async def _rank_of(c: httpx.AsyncClient, path: str, body: dict[str, object], headers: dict[str, str]) -> int:
    r = await c.post(path, json=body, headers=headers)
    assert r.status_code == 200, r.text
    if path == "/generate":
        rank: int = r.json()["meta_info"]["dp_rank"]
        return rank
    rid = r.json()["id"]
    del rid
    raise AssertionError("rank of an OpenAI reply is observed through /sim/state")


async def test_pinning_by_body_and_header(start_server: StartServer) -> None:
    server = await start_server(dp_size=4)
    gen = {"text": "pin me", "sampling_params": {"max_new_tokens": 1}}
    async with httpx.AsyncClient(base_url=server.url) as c:
        assert {await _rank_of(c, "/generate", {**gen, "routed_dp_rank": 3}, {}) for _ in range(4)} == {3}
        # The newest servers ignore the old key on /generate (round robin instead).
        old_key = {await _rank_of(c, "/generate", {**gen, "data_parallel_rank": 2}, {}) for _ in range(4)}
        assert len(old_key) > 1
        steps_before = (await c.get("/sim/state")).json()["steps"]
        chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        for _ in range(3):
            assert (
                await c.post("/v1/chat/completions", json=chat, headers={"X-Data-Parallel-Rank": "2"})
            ).is_success
        for _ in range(3):
            assert (await c.post("/v1/chat/completions", json={**chat, "data_parallel_rank": 1})).is_success
        steps_after = (await c.get("/sim/state")).json()["steps"]
    moved = [a - b for a, b in zip(steps_after, steps_before, strict=True)]
    assert moved[0] == 0 and moved[3] == 0
    assert moved[1] > 0 and moved[2] > 0


async def test_data_parallel_rank_honoured_on_old_generate(start_server: StartServer) -> None:
    for version in ("0.5.5", "0.5.12"):  # only key / alias period
        server = await start_server(dp_size=4, sglang_version=version)
        async with httpx.AsyncClient(base_url=server.url) as c:
            body = {"text": "x", "data_parallel_rank": 2, "sampling_params": {"max_new_tokens": 1}}
            assert {await _rank_of(c, "/generate", body, {}) for _ in range(4)} == {2}, version
    server = await start_server(dp_size=4, sglang_version="0.5.5")
    async with httpx.AsyncClient(base_url=server.url) as c:
        body = {"text": "x", "routed_dp_rank": 2, "sampling_params": {"max_new_tokens": 1}}
        assert len({await _rank_of(c, "/generate", body, {}) for _ in range(4)}) > 1  # key unknown back then


def test_version_table() -> None:
    assert resolve_version(None).version == "0.5.15"
    assert resolve_version("v0.5.9.post1").date == resolve_version("0.5.9").date
    assert resolve_version("2026-03-01").version == "0.5.9"
    with pytest.raises(ValueError, match="unknown SGLang version"):
        resolve_version("9.9.9")


async def test_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/generate", json={"text": "metrics please", "sampling_params": {"max_new_tokens": 3}})
    text = (await client.get("/metrics")).text
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
        "sglang:num_requests_total",
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:cached_tokens_total",
        "sglang:time_to_first_token_seconds_bucket",
    ):
        assert f"\n{name}{{" in text, name
    assert (
        'sglang:generation_tokens_total{model_name="deepseek-ai/DeepSeek-V3",engine_type="unified"} 3.0'
        in text
    )
    assert 'sglang:num_requests_total{model_name="deepseek-ai/DeepSeek-V3",engine_type="unified"} 1.0' in text
    assert 'dp_rank="1"' in text
    assert 'sglang:http_requests_total{endpoint="/generate",method="POST"} 1.0' in text
    assert 'sglang:http_responses_total{endpoint="/generate",status_code="200",method="POST"} 1.0' in text
    assert "sglang:http_requests_active 1.0" in text  # the scrape itself
    les = [
        line.split('le="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("sglang:time_to_first_token_seconds_bucket")
    ]
    assert les == [
        "0.1",
        "0.2",
        "0.4",
        "0.6",
        "0.8",
        "1.0",
        "2.0",
        "4.0",
        "6.0",
        "8.0",
        "10.0",
        "20.0",
        "40.0",
        "60.0",
        "80.0",
        "100.0",
        "200.0",
        "400.0",
        "+Inf",
    ]


async def test_metrics_absent_without_flag(start_server: StartServer) -> None:
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url) as c:
        assert (await c.get("/metrics")).status_code == 404


async def test_flush_cache_refused_while_running(client: httpx.AsyncClient) -> None:
    ok = await client.post("/flush_cache")
    assert ok.status_code == 200 and ok.text.startswith("Cache flushed.") and "content-type" not in ok.headers
    long = asyncio.create_task(
        client.post(
            "/generate",
            json={"text": "busy", "sampling_params": {"max_new_tokens": 60000, "ignore_eos": True}},
        )
    )
    await asyncio.sleep(0.1)
    refused = await client.get("/flush_cache")
    assert refused.status_code == 400
    await client.post("/abort_request", json={"abort_all": True})
    assert (await long).json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert (await client.post("/flush_cache")).status_code == 200


async def test_embeddings_refused_on_a_generation_model(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400
    assert r.json()["message"].startswith("This model does not appear to be an embedding model by default.")


async def test_health_without_generation(start_server: StartServer) -> None:
    server = await start_server(health_runs_generate=False, dp_size=1)
    async with httpx.AsyncClient(base_url=server.url) as c:
        before = (await c.get("/sim/state")).json()["steps"]
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/sim/state")).json()["steps"] == before  # no generate was run
        assert (await c.get("/health_generate")).status_code == 200
        assert (await c.get("/sim/state")).json()["steps"] != before


async def test_enable_metrics_adds_request_timing(client: httpx.AsyncClient) -> None:
    meta = (
        await client.post("/generate", json={"text": "timing", "sampling_params": {"max_new_tokens": 4}})
    ).json()["meta_info"]
    for key in (
        "queue_time",
        "forward_entry_time",
        "prefill_finished_time",
        "request_received_ts",
        "request_finished_ts",
        "decode_throughput",
    ):
        assert key in meta, key
    assert meta["request_received_ts"] <= meta["forward_entry_time"] <= meta["request_finished_ts"]


async def test_disable_radix_cache(start_server: StartServer) -> None:
    server = await start_server(disable_radix_cache=True, dp_size=1)
    prompt = {"text": "same prompt " * 30, "sampling_params": {"max_new_tokens": 1}}
    async with httpx.AsyncClient(base_url=server.url) as c:
        for _ in range(2):
            assert (await c.post("/generate", json=prompt)).json()["meta_info"]["cached_tokens"] == 0
        assert (await c.get("/server_info")).json()["disable_radix_cache"] is True


async def test_health_counts_any_scheduler_output_like_sglang(start_server: StartServer) -> None:
    # One running slot, busy for seconds: the probe's own request cannot run within its 0.3 s, but the
    # running request's tokens are scheduler output, which is all SGLang's health check waits for.
    server = await start_server(
        dp_size=1, max_running_requests=1, health_check_timeout_s=0.3, time_scale=0.01
    )
    long = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        busy = [asyncio.create_task(c.post("/generate", json=long)) for _ in range(2)]
        await asyncio.sleep(0.2)
        assert (await c.get("/health")).status_code == 200
        await c.post("/abort_request", json={"abort_all": True})
        await asyncio.gather(*busy)


async def test_total_requests_balancing_avoids_the_busy_rank(start_server: StartServer) -> None:
    server = await start_server(dp_size=4, load_balance_method="total_requests")
    long = {
        "text": "busy",
        "routed_dp_rank": 0,
        "sampling_params": {"max_new_tokens": 60000, "ignore_eos": True},
    }
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        busy = [asyncio.create_task(c.post("/generate", json=long)) for _ in range(2)]
        await asyncio.sleep(0.1)
        ranks = [
            await _rank_of(c, "/generate", {"text": "quick", "sampling_params": {"max_new_tokens": 1}}, {})
            for _ in range(6)
        ]
        assert 0 not in ranks
        assert (await c.get("/server_info")).json()["load_balance_method"] == "total_requests"
        await c.post("/abort_request", json={"abort_all": True})
        await asyncio.gather(*busy)
