"""Errors where and how SGLang gives them: plain 400 before a stream, error chunks inside one; fuzz."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from backends.sim import SimServer

from .conftest import StartServer, sse_events

MSG = [{"role": "user", "content": "hi"}]


async def test_invalid_json_is_plain_400_even_for_streams(client: httpx.AsyncClient) -> None:
    for path in ("/generate", "/v1/chat/completions", "/v1/completions"):
        r = await client.post(
            path, content=b'{"stream": true, ', headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, path
        body = r.json()
        assert list(body) == ["object", "message", "type", "param", "code"]
        assert body["type"] == "Bad Request" and body["code"] == 400


async def test_v1_requires_json_content_type(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", content=json.dumps({"messages": MSG}), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 400
    assert "application/json" in r.json()["message"]


async def test_generate_semantic_error_non_stream(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "Either text, input_ids or input_embeds should be provided."}}
    r = await client.post("/generate", json={"text": "x", "sampling_params": {"temperature": -1}})
    assert r.json() == {"error": {"message": "temperature must be a non-negative finite number, got -1.0."}}
    r = await client.post("/generate", json={"text": "x", "sampling_params": {"top_p": 0}})
    assert r.json() == {"error": {"message": "top_p must be in (0, 1], got 0.0."}}


async def test_generate_semantic_error_inside_200_stream(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"text": "x", "stream": True, "sampling_params": {"top_p": 2}})
    assert r.status_code == 200
    events = sse_events(r.content)
    assert events[-1] == b"[DONE]" and len(events) == 2
    assert json.loads(events[0]) == {
        "error": {
            "message": "top_p must be in (0, 1], got 2.0.",
            "type": "invalid_request_error",
            "code": 400,
            "retryable": False,
        }
    }


async def test_old_server_stream_error_chunk_is_bare(start_server: StartServer) -> None:
    server = await start_server(sglang_version="0.5.13")
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post("/generate", json={"stream": True})
    first = json.loads(sse_events(r.content)[0])
    assert first == {"error": {"message": "Either text, input_ids or input_embeds should be provided."}}


async def test_context_length_checks(start_server: StartServer) -> None:
    server = await start_server(context_length=64)
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post("/generate", json={"input_ids": list(range(1, 80))})
        assert (
            r.json()["error"]["message"]
            == "The input (79 tokens) is longer than the model's context length (64 tokens)."
        )
        r = await c.post("/generate", json={"input_ids": [1] * 10, "sampling_params": {"max_new_tokens": 60}})
        assert r.json()["error"]["message"].startswith(
            "Requested token count exceeds the model's maximum context length of 64 tokens. "
            "You requested a total of 70 tokens: 10 tokens from the input messages and "
            "60 tokens for the completion."
        )
        r = await c.post("/v1/completions", json={"prompt": [1] * 10, "max_tokens": 60, "stream": True})
        assert r.status_code == 400  # kick-started stream: still a plain JSON error
        assert r.json()["type"] == "BadRequest"


async def test_openai_validation_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    assert r.json() == {
        "object": "error",
        "message": "Messages cannot be empty.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens must be positive" in r.json()["message"]
    assert r.json()["type"] == "Bad Request"
    r = await client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": -1})
    assert r.json()["message"] == "max_new_tokens must be at least 0, got -1."
    r = await client.post("/v1/chat/completions", json={"messages": MSG, "temperature": -0.5, "stream": True})
    assert r.status_code == 400 and r.json()["message"].startswith("temperature must be a non-negative")
    r = await client.post("/v1/chat/completions", json={"messages": MSG, "top_p": 1.5})
    assert r.json()["message"] == "top_p must be in (0, 1], got 1.5."
    r = await client.post("/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 400 and r.json()["type"] == "Bad Request"


async def test_rank_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"text": "x", "routed_dp_rank": 5})
    assert r.json() == {"error": {"message": "routed_dp_rank=5 out of range [0, 2)"}}
    r = await client.post(
        "/v1/chat/completions", json={"messages": MSG}, headers={"X-Data-Parallel-Rank": "two"}
    )
    assert r.status_code == 400
    assert r.json()["message"] == "Invalid X-Data-Parallel-Rank header: must be an integer, got 'two'"
    r = await client.post(
        "/v1/chat/completions", json={"messages": MSG}, headers={"X-Data-Parallel-Rank": "9"}
    )
    assert r.json()["message"] == "routed_dp_rank=9 out of range [0, 2)"


async def test_duplicate_rid(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"text": ["a", "b"], "rid": ["same", "same"]})
    assert r.json() == {"error": {"message": "Duplicate request ID detected: same"}}


async def test_unknown_route_and_wrong_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404 and r.content == b'{"detail":"Not Found"}'
    r = await client.get("/generate")
    assert r.status_code == 405 and r.content == b'{"detail":"Method Not Allowed"}'
    assert r.headers["allow"] == "POST, PUT"
    r = await client.post("/health")
    assert r.status_code == 405


async def test_api_key(start_server: StartServer) -> None:
    server = await start_server(api_key="sk-test", enable_metrics=True)
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        r = await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await c.get("/v1/models", headers={"Authorization": "Bearer sk-test"})
        assert r.status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([-1, 0, 1, 2, 10**12, -(10**12)])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1.5, 1e308, 0.5])
    if kind == 4:
        return rng.choice(["", "x", "hello world", "\u2603\x00", "<｜User｜>"])
    if kind == 5:
        return [rng.randrange(-5, 200000) for _ in range(rng.randrange(4))]
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(KEYS): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


KEYS = [
    "text",
    "input_ids",
    "sampling_params",
    "stream",
    "rid",
    "messages",
    "prompt",
    "max_tokens",
    "n",
    "temperature",
    "top_p",
    "max_new_tokens",
    "routed_dp_rank",
    "data_parallel_rank",
    "stop",
    "role",
    "content",
    "stream_options",
    "bootstrap_room",
    "bootstrap_host",
    "stop_token_ids",
    "logprobs",
]


@pytest.mark.timeout(120)
async def test_fuzz_never_500s_or_hangs(server: SimServer) -> None:
    rng = random.Random(1234)
    paths = ["/generate", "/v1/chat/completions", "/v1/completions", "/abort_request", "/flush_cache"]
    bodies: list[tuple[str, dict[str, object]]] = []
    for _ in range(400):
        body: dict[str, object] = {rng.choice(KEYS): _random_value(rng) for _ in range(rng.randrange(1, 6))}
        if rng.random() < 0.5:
            body["sampling_params"] = {"max_new_tokens": rng.randrange(0, 4)}
            body["max_tokens"] = rng.randrange(1, 4)
        bodies.append((rng.choice(paths), body))
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as c:

        async def send(path: str, body: dict[str, object]) -> None:
            r = await c.post(path, content=json.dumps(body))
            assert r.status_code < 500, (body, r.text)

        for start in range(0, len(bodies), 20):
            await asyncio.gather(*(send(path, body) for path, body in bodies[start : start + 20]))
        for raw in (b"", b"null", b"[]", b"\xff\xfe", b"{" * 1000, b'{"text": "' + b"a" * 10000 + b'"}'):
            r = await c.post("/generate", content=raw)
            assert r.status_code in (200, 400), (raw[:20], r.text)
        assert (await c.get("/health")).status_code == 200


async def test_cors(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models", headers={"Origin": "http://example.test"})
    assert r.headers["access-control-allow-origin"] == "http://example.test"
    assert r.headers["access-control-allow-credentials"] == "true"
    pre = await client.options(
        "/v1/chat/completions",
        headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 200 and pre.text == "OK"
    assert pre.headers["access-control-allow-origin"] == "http://example.test"


async def test_out_of_vocab_ids_and_absurd_fan_out(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"input_ids": [1, 10**9]})
    assert r.json() == {
        "error": {
            "message": "The input_ids [1, 1000000000] contains values greater than the vocab size (129280)."
        }
    }
    for n in (10**6, 10**12):
        r = await client.post(
            "/v1/chat/completions", json={"messages": MSG, "n": n, "max_tokens": 1}, timeout=5
        )
        assert r.status_code == 400
        r = await client.post("/generate", json={"text": "x", "sampling_params": {"n": n}}, timeout=5)
        assert r.status_code == 400
