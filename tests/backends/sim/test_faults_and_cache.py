"""Injected faults, prefix-cache reporting, and freeing a rank when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time

import httpx
import pytest

from backends.sim import Faults, SimServer

from .conftest import StartServer

GEN = {"text": "fault injection", "sampling_params": {"max_new_tokens": 4}}


async def test_cached_tokens_grow_on_repeated_prefix(start_server: StartServer) -> None:
    server = await start_server(dp_size=1)
    system = "You are a helpful assistant that answers in detail. " * 20
    async with httpx.AsyncClient(base_url=server.url) as c:
        first = (
            await c.post("/generate", json={"text": system + "Q1?", "sampling_params": {"max_new_tokens": 2}})
        ).json()
        second = (
            await c.post("/generate", json={"text": system + "Q2?", "sampling_params": {"max_new_tokens": 2}})
        ).json()
    assert second["meta_info"]["cached_tokens"] > first["meta_info"]["cached_tokens"]
    assert second["meta_info"]["cached_tokens"] >= 0.8 * second["meta_info"]["prompt_tokens"]


async def test_faults_endpoint_roundtrip(client: httpx.AsyncClient) -> None:
    assert (await client.get("/sim/faults")).json()["error_rate"] == 0.0
    r = await client.post("/sim/faults", json={"error_rate": 0.25, "latency_ms": 5})
    assert r.status_code == 200 and r.json()["error_rate"] == 0.25 and r.json()["latency_ms"] == 5
    assert (await client.post("/sim/faults", json={"error_rate": 3})).status_code == 400
    assert (await client.post("/sim/faults", json={"slowdown": "x"})).status_code == 400
    assert (await client.delete("/sim/faults")).json()["error_rate"] == 0.0


async def test_error_rate_gives_sglang_queue_full(client: httpx.AsyncClient) -> None:
    await client.post("/sim/faults", json={"error_rate": 1.0})
    r = await client.post("/generate", json=GEN)
    assert r.status_code == 503
    assert r.json() == {
        "object": "error",
        "message": "The request queue is full.",
        "type": "503",
        "param": None,
        "code": 503,
    }
    r = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    assert r.status_code == 503  # kick-started stream: the refusal comes before the 200
    r = await client.post("/generate", json={**GEN, "stream": True})
    assert r.status_code == 200
    chunk = json.loads(r.content.split(b"\n\n")[0][len(b"data: ") :])
    assert chunk["meta_info"]["finish_reason"] == {
        "type": "abort",
        "message": "The request queue is full.",
        "status_code": 503,
        "err_type": None,
    }
    assert (await client.get("/health")).status_code == 200


async def test_latency_and_slowdown(start_server: StartServer) -> None:
    # A coarser time scale, so that simulated step time dominates the request's cost.
    server = await start_server(time_scale=0.05)
    body = {"text": "slow", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        await client.post("/sim/faults", json={"latency_ms": 300})
        t0 = time.perf_counter()
        await client.post("/generate", json=GEN)
        assert time.perf_counter() - t0 >= 0.3
        await client.post("/sim/faults", json={"latency_ms": 0})
        t0 = time.perf_counter()
        await client.post("/generate", json=body)
        base = time.perf_counter() - t0
        await client.post("/sim/faults", json={"slowdown": 20})
        t0 = time.perf_counter()
        await client.post("/generate", json=body)
        assert time.perf_counter() - t0 > 3 * base


async def test_hang_before_first_byte(client: httpx.AsyncClient) -> None:
    await client.post("/sim/faults", json={"hang": True})
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/generate", json={**GEN, "stream": True}, timeout=0.3)
    pending = asyncio.create_task(client.post("/generate", json=GEN))
    await asyncio.sleep(0.2)
    assert not pending.done()
    await client.post("/sim/faults", json={"hang": False})
    assert (await pending).status_code == 200


async def test_drop_mid_stream_and_mid_body(client: httpx.AsyncClient) -> None:
    await client.post("/sim/faults", json={"drop_after_chunks": 2})
    received: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/generate", json={**GEN, "stream": True}) as r:
            assert r.status_code == 200
            async for raw in r.aiter_raw():
                received.append(raw)
    assert b"".join(received).count(b"data: ") == 2
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/generate", json=GEN)
    await client.delete("/sim/faults")
    assert (await client.post("/generate", json=GEN)).status_code == 200


async def test_refuse_connections(server: SimServer) -> None:
    await server.set_faults(Faults(refuse_connections=True))
    async with httpx.AsyncClient(base_url=server.url) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("/health")
    await server.set_faults(Faults())
    async with httpx.AsyncClient(base_url=server.url) as c:
        assert (await c.get("/health")).status_code == 200
        # Over HTTP, refusal must carry its own end: the endpoint is unreachable while refusing.
        assert (
            await c.post("/sim/faults", json={"refuse_connections": True, "refuse_for_s": 1.5})
        ).is_success
    async with httpx.AsyncClient(base_url=server.url) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("/health")
        for _ in range(100):  # listening again after ~1.5 s
            await asyncio.sleep(0.1)
            with contextlib.suppress(httpx.ConnectError):
                assert (await c.get("/health")).status_code == 200
                break
        assert (await c.get("/sim/faults")).json()["refuse_connections"] is False


async def test_client_disconnect_aborts_and_frees_the_rank(start_server: StartServer) -> None:
    server = await start_server(dp_size=1, enable_metrics=True)
    long = {"text": "long", "stream": True, "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True}}
    async with httpx.AsyncClient(base_url=server.url) as c:
        for stream in (True, False):
            if stream:
                async with c.stream("POST", "/generate", json=long) as r:
                    async for _ in r.aiter_raw():
                        break  # leaving the block closes the connection mid-stream
            else:
                with pytest.raises(httpx.ReadTimeout):
                    await c.post("/generate", json={**long, "stream": False}, timeout=0.3)
            loads = []
            for _ in range(100):
                loads = (await c.get("/v1/loads", params={"include": "core"})).json()["loads"]
                if (
                    loads[0]["num_running_reqs"] == 0
                    and not (await c.get("/sim/state")).json()["inflight"][0]
                ):
                    break
                await asyncio.sleep(0.02)
            assert loads[0]["num_running_reqs"] == 0
        assert (await c.post("/flush_cache")).status_code == 200
        assert "sglang:num_aborted_requests_total" in (await c.get("/metrics")).text


async def test_abort_request_endpoint(client: httpx.AsyncClient) -> None:
    body = {
        "text": "abort me",
        "rid": "victim",
        "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True},
    }
    task = asyncio.create_task(client.post("/generate", json=body))
    await asyncio.sleep(0.1)
    r = await client.post("/abort_request", json={"rid": "victim"})
    assert r.status_code == 200 and r.content == b""
    reply = (await task).json()
    assert reply["meta_info"]["finish_reason"]["type"] == "abort"


async def test_decode_waiting_for_kv_gives_up_when_client_leaves(start_server: StartServer) -> None:
    prefill = await start_server(disaggregation_mode="prefill", disaggregation_bootstrap_port=0)
    decode = await start_server(disaggregation_mode="decode", waiting_timeout_s=60)
    body = {
        "text": "x",
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": prefill.bootstrap_port,
        "bootstrap_room": 99,
    }
    async with httpx.AsyncClient(base_url=decode.url) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/generate", json=body, timeout=0.3)
        for _ in range(50):
            if (await c.get("/sim/state")).json()["waiting_for_pd_peer"] == 0:
                break
            await asyncio.sleep(0.02)
        assert (await c.get("/sim/state")).json()["waiting_for_pd_peer"] == 0
        assert (await c.post("/flush_cache")).status_code == 200


async def _random_op(c: httpx.AsyncClient, rng: random.Random) -> None:
    kind = rng.randrange(6)
    try:
        if kind == 0:
            body = {
                "text": "hello " * rng.randrange(1, 50),
                "stream": rng.random() < 0.5,
                "sampling_params": {"max_new_tokens": rng.randrange(0, 40)},
            }
            await c.post("/generate", json=body, timeout=rng.choice([0.05, 5.0]))
        elif kind == 1:
            chat = {
                "messages": [{"role": "user", "content": "x" * rng.randrange(1, 400)}],
                "max_tokens": rng.randrange(1, 30),
                "stream": True,
                "n": rng.randrange(1, 3),
            }
            async with c.stream("POST", "/v1/chat/completions", json=chat) as r:
                async for _ in r.aiter_raw():
                    if rng.random() < 0.1:
                        break
        elif kind == 2:
            completion = {
                "prompt": ["a", "b"],
                "max_tokens": 5,
                "stream": rng.random() < 0.5,
                "stream_options": {"include_usage": True},
            }
            await c.post("/v1/completions", json=completion)
        elif kind == 3:
            faults = {
                "drop_after_chunks": rng.choice([None, 1, 3]),
                "latency_ms": rng.choice([0, 5]),
                "error_rate": rng.choice([0, 0.2]),
            }
            await c.post("/sim/faults", json=faults)
        elif kind == 4:
            await c.get(rng.choice(["/health", "/v1/loads", "/metrics", "/get_load", "/server_info"]))
        else:
            await c.post("/abort_request", json={"abort_all": True})
    except httpx.HTTPError:
        pass  # injected drops and client-side timeouts


async def test_concurrent_chaos_leaves_a_clean_server(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(dp_size=4, enable_metrics=True, time_scale=0.005)
    rng = random.Random(7)
    async with httpx.AsyncClient(
        base_url=server.url, timeout=10, limits=httpx.Limits(max_connections=200)
    ) as c:
        for _ in range(4):
            await asyncio.gather(*(_random_op(c, rng) for _ in range(80)))
        await c.delete("/sim/faults")
        for _ in range(100):
            state = (await c.get("/sim/state")).json()
            if not any(state["inflight"]):
                break
            await asyncio.sleep(0.05)
        assert not any(state["inflight"])
        loads = (await c.get("/v1/loads", params={"include": "core"})).json()["loads"]
        assert all(x["num_running_reqs"] == 0 and x["num_waiting_reqs"] == 0 for x in loads)
        assert (await c.post("/flush_cache")).status_code == 200
        assert (await c.get("/health")).status_code == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_stop_with_streams_in_flight_ends_them(start_server: StartServer) -> None:
    server = await start_server(dp_size=2)
    long = {"text": "long", "stream": True, "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True}}
    received: list[bytes] = []

    async def consume() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
            with contextlib.suppress(httpx.HTTPError):
                async with c.stream("POST", "/generate", json=long) as r:
                    async for raw in r.aiter_raw():
                        received.append(raw)

    streams = [asyncio.create_task(consume()) for _ in range(3)]
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    await server.stop()
    await asyncio.wait_for(asyncio.gather(*streams), 5)
    assert time.perf_counter() - t0 < 5
    assert b'"type":"abort"' in b"".join(received)


async def test_prefill_client_leaving_fails_the_waiting_decode_fast(start_server: StartServer) -> None:
    prefill = await start_server(disaggregation_mode="prefill", disaggregation_bootstrap_port=0)
    decode = await start_server(disaggregation_mode="decode", waiting_timeout_s=60)
    body = {
        "text": "x",
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": prefill.bootstrap_port,
        "bootstrap_room": 4242,
        "sampling_params": {"max_new_tokens": 60000, "ignore_eos": True},
    }
    async with httpx.AsyncClient(timeout=30) as c:
        # The prefill's client leaves while the prefill still waits for its decode to connect.
        with pytest.raises(httpx.ReadTimeout):
            await c.post(prefill.url + "/generate", json=body, timeout=0.2)
        t0 = time.perf_counter()
        r = await c.post(decode.url + "/generate", json=body)
    assert r.status_code == 500
    assert "Failed to get kvcache from prefill instance" in r.json()["message"]
    assert time.perf_counter() - t0 < 10


async def test_reset_connections(server: SimServer) -> None:
    await server.set_faults(Faults(reset_connections=True))
    async with httpx.AsyncClient(base_url=server.url) as c:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)):
            await c.get("/health")
    await server.set_faults(Faults())
    async with httpx.AsyncClient(base_url=server.url) as c:
        assert (await c.get("/health")).status_code == 200
