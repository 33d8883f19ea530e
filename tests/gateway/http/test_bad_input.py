"""Every class of bad input gets an OpenAI-shaped error with the right status, never a 500 or a hang."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from gateway.http.proxy import Proxy, ProxySettings
from gateway.routing import Route, RoutingRequest
from tests.gateway.http._fakes import FakeResponse, Harness, worker

A = "http://10.0.0.1:30000"
OK = FakeResponse(200, [b"{}"])


def harness(**config: Any) -> Harness:
    return Harness([worker(A)], lambda _request: FakeResponse(200, [b"{}"]), **config)


def assert_openai_error(
    reply: Any, status: int, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


CASES = [
    ("/v1/chat/completions", b"{not json", "invalid_json", None),
    ("/v1/chat/completions", b"", "invalid_json", None),
    ("/v1/chat/completions", b"[1, 2]", "invalid_json", None),
    ("/v1/chat/completions", b'"just a string"', "invalid_json", None),
    ("/v1/chat/completions", b"null", "invalid_json", None),
    ("/v1/chat/completions", b'{"model": "m"}', "invalid_request", "messages"),
    ("/v1/chat/completions", b'{"messages": "hello"}', "invalid_request", "messages"),
    ("/v1/chat/completions", b'{"messages": [], "stream": "yes"}', "invalid_request", "stream"),
    ("/v1/chat/completions", b'{"messages": [], "model": 42}', "invalid_request", "model"),
    ("/v1/chat/completions", b'{"messages": [], "max_tokens": "ten"}', "invalid_request", "max_tokens"),
    ("/v1/chat/completions", b'{"messages": [], "max_tokens": -1}', "invalid_request", "max_tokens"),
    ("/v1/completions", b'{"prompt": {"a": 1}}', "invalid_request", "prompt"),
    ("/v1/completions", b'{"prompt": [1.5, 2]}', "invalid_request", "prompt"),
    ("/v1/completions", b'{"model": "m"}', "invalid_request", "prompt"),
    ("/generate", b'{"sampling_params": {"max_new_tokens": 4}}', "invalid_request", "text"),
    ("/generate", b'{"text": 5}', "invalid_request", "text"),
    ("/generate", b'{"input_ids": [[1], "x"]}', "invalid_request", "input_ids"),
    (
        "/generate",
        b'{"text": "x", "sampling_params": {"max_new_tokens": "many"}}',
        "invalid_request",
        "sampling_params",
    ),
    ("/v1/chat/completions", b'{"messages": [1]}', "invalid_request", "messages"),
    ("/v1/completions", b'{"prompt": "x", "model": {}}', "invalid_request", "model"),
    ("/generate", b'{"text": "x", "sampling_params": [1]}', "invalid_request", "sampling_params"),
    ("/generate", b'{"text": "x"', "invalid_json", None),
    ("/generate", b"\xff\xfe", "invalid_json", None),
    # Invalid UTF-8 inside a string is Python's UnicodeDecodeError in msgspec, not a DecodeError.
    (
        "/v1/chat/completions",
        b'{"messages":[{"role":"user","content":"\xff"}],"max_tokens":2}',
        "invalid_json",
        None,
    ),
    ("/v1/chat/completions", b'{"model":"\xff","messages":[]}', "invalid_json", None),
    ("/v1/completions", b'{"prompt":"\xc3"}', "invalid_json", None),
    ("/v1/completions", b'{"prompt":["a", "\xff"]}', "invalid_json", None),
    ("/generate", b'{"text":"\xff"}', "invalid_json", None),
    ("/generate", b'{"text":"x","model":"\xfe"}', "invalid_json", None),
]


@pytest.mark.parametrize(("path", "body", "code", "param"), CASES)
async def test_malformed_bodies_are_400(path: str, body: bytes, code: str, param: str | None) -> None:
    gateway = harness()
    async with gateway.client() as client:
        reply = await client.post(path, content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(reply, 400, code, param)
    assert error["type"] == "invalid_request_error"
    assert gateway.transport.requests == []


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "application/xml", "image/png"])
async def test_non_json_content_type_is_400(content_type: str) -> None:
    async with harness().client() as client:
        reply = await client.post(
            "/v1/chat/completions", content=b'{"messages": []}', headers={"content-type": content_type}
        )
    assert_openai_error(reply, 400, "unsupported_content_type")


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json; charset=utf-8", "application/x-www-form-urlencoded", "text/plain"],
)
async def test_json_compatible_content_types_are_read_as_json(content_type: str | None) -> None:
    gateway = harness()
    headers = {} if content_type is None else {"content-type": content_type}
    async with gateway.client() as client:
        reply = await client.post("/v1/chat/completions", content=b'{"messages": []}', headers=headers)
    assert reply.status_code == 200
    # Whatever the client declared, the server gets JSON.
    sent = dict((k.lower(), v) for k, v in gateway.transport.requests[0].headers)
    assert sent["content-type"] == "application/json"


async def test_body_over_limit_is_413_by_declared_length() -> None:
    gateway = harness(max_body_bytes=1000)
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'
    async with gateway.client() as client:
        reply = await client.post("/v1/chat/completions", content=body)
    assert_openai_error(reply, 413, "request_too_large")
    assert gateway.transport.requests == []


async def test_body_over_limit_is_413_when_streamed_without_length() -> None:
    gateway = harness(max_body_bytes=1000)

    async def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 200

    async with gateway.client() as client:
        reply = await client.post("/generate", content=chunks())
    assert_openai_error(reply, 413, "request_too_large")


async def test_default_limit_is_4_mib() -> None:
    gateway = harness()
    text = b"y" * (4 * 1024 * 1024 - 100)
    async with gateway.client() as client:
        ok = await client.post("/generate", content=b'{"text": "' + text + b'"}')
        too_big = await client.post("/generate", content=b'{"text": "' + text + b"y" * 200 + b'"}')
    assert ok.status_code == 200
    assert_openai_error(too_big, 413)


async def test_bad_content_length_is_400() -> None:
    gateway = harness()
    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [(b"content-length", b"abc")]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await gateway.app(scope, receive, send)
    assert sent[0]["status"] == 400


async def test_unknown_model_is_404_model_not_found() -> None:
    async with harness().client() as client:
        reply = await client.post("/v1/chat/completions", content=b'{"model": "gpt-4", "messages": []}')
        models = await client.get("/v1/models/gpt-4")
    error = assert_openai_error(reply, 404, "model_not_found", "model")
    assert "gpt-4" in error["message"]
    assert_openai_error(models, 404, "model_not_found", "model")


async def test_no_healthy_worker_is_503_with_retry_after() -> None:
    gateway = Harness([worker(A, healthy=False)], lambda _r: OK, retry_after_s=7)
    async with gateway.client() as client:
        reply = await client.post(
            "/v1/chat/completions", content=b'{"model": "deepseek-ai/DeepSeek-V3", "messages": []}'
        )
    assert_openai_error(reply, 503, "no_healthy_worker")
    assert reply.headers["retry-after"] == "7"


async def test_no_model_discovered_yet_is_503_even_without_model() -> None:
    gateway = Harness([], lambda _r: OK, retry_after_s=5)
    async with gateway.client() as client:
        for path, body in [
            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}'),
            ("/v1/completions", b'{"prompt": "hi"}'),
            ("/generate", b'{"text": "hi"}'),
        ]:
            reply = await client.post(path, content=body)
            error = assert_openai_error(reply, 503, "no_healthy_worker")
            assert "yet" in error["message"] and error["type"] == "server_error"
            assert reply.headers["retry-after"] == "5"
    assert gateway.transport.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("DELETE", "/v1/completions"),
        ("GET", "/generate"),
        ("POST", "/health"),
        ("PUT", "/v1/models"),
    ],
)
async def test_wrong_method_is_405(method: str, path: str) -> None:
    async with harness().client() as client:
        reply = await client.request(method, path, content=b"{}")
    assert_openai_error(reply, 405, "method_not_allowed")
    assert reply.headers.get("allow")


@pytest.mark.parametrize("path", ["/", "/v1/chat", "/v2/chat/completions", "/admin/nothing", "/generate/x"])
async def test_unknown_route_is_404(path: str) -> None:
    async with harness().client() as client:
        reply = await client.post(path, content=b"{}")
        get_reply = await client.get(path)
    assert_openai_error(reply, 404, "not_found")
    assert_openai_error(get_reply, 404, "not_found")


class ExplodingRouter:
    async def route(self, req: RoutingRequest) -> Route[Any]:
        raise RuntimeError("a bug")

    async def finish(self, route: Route[Any], outcome: Any) -> None:
        return None

    def recent_decisions(self, limit: int) -> list[dict[str, Any]]:
        raise RuntimeError("another bug")


async def test_catch_all_answers_openai_shaped_500_on_any_bug() -> None:
    gateway = harness()
    gateway.app.proxy._router = ExplodingRouter()
    async with gateway.client() as client:
        reply = await client.post("/v1/chat/completions", content=b'{"messages": []}')
    assert_openai_error(reply, 500, "internal_error")


async def test_catch_all_before_routing() -> None:
    gateway = harness()

    def broken() -> list[str]:
        raise RuntimeError("registry bug")

    gateway.app.proxy._models = broken
    async with gateway.client() as client:
        reply = await client.post("/generate", content=b'{"text": "no model given"}')
    assert_openai_error(reply, 500, "internal_error")


async def test_catch_all_on_litestar_routes() -> None:
    gateway = harness()
    gateway.router.inner.recent_decisions = ExplodingRouter().recent_decisions
    async with gateway.client() as client:
        reply = await client.get("/admin/decisions")
    assert_openai_error(reply, 500, "internal_error")


async def test_a_body_that_stalls_mid_way_is_408_after_the_body_read_timeout() -> None:
    gateway = harness()
    proxy = Proxy(
        router=gateway.router,
        transport=gateway.transport,
        models=gateway.registry.models,
        settings=ProxySettings(body_read_timeout_s=0.05),
    )
    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [(b"content-length", b"100")]}
    sent: list[dict[str, Any]] = []
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b'{"text": "ab', "more_body": True}
        await asyncio.Event().wait()  # the rest never comes, and the client does not leave either
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(proxy.handle(scope, receive, send), 5)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    error = msgspec.json.decode(sent[1]["body"])["error"]
    assert (error["code"], error["type"]) == ("request_timeout", "invalid_request_error")
    assert gateway.transport.requests == []
    assert proxy.metrics.requests == {("generate", "", "4xx"): 1}


def test_body_read_timeout_defaults_to_30_s() -> None:
    assert ProxySettings().body_read_timeout_s == 30.0
