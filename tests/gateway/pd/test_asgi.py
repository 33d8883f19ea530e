"""PDProxy's own answers (before PD forwarding): every failure is OpenAI-shaped and counted."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from gateway.metrics import Metrics
from gateway.pd import PDSettings
from gateway.pd.asgi import PDProxy


class _Unused:
    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the regular proxy must not be reached")


class _PD:
    """A forwarder with pools for every model whose ``serves`` can be made to break."""

    def __init__(self, *, broken: bool = False) -> None:
        self.broken = broken
        self.settings = PDSettings(retry_after_s=3)

    def has_pools(self) -> bool:
        return True

    def serves(self, model: str) -> bool:
        if self.broken:
            raise RuntimeError("a bug")
        return True


async def _call(
    pd: _PD, body: bytes, path: str = "/v1/chat/completions", models: tuple[str, ...] = ("m",)
) -> tuple[list[Any], Metrics]:
    metrics = Metrics()
    proxy = PDProxy(_Unused(), pd, models=lambda: list(models), metrics=metrics)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await proxy.handle(scope, receive, send)
    return sent, metrics


def _error(sent: list[Any]) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = msgspec.json.decode(sent[1]["body"])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return int(sent[0]["status"]), body["error"]


def _requests_total(metrics: Metrics) -> str:
    return "\n".join(
        line for line in metrics.render().decode().splitlines() if line.startswith("cachet_requests_total")
    )


async def test_invalid_utf8_over_pd_is_400_invalid_json() -> None:
    for path, body in [
        ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xff"}],"max_tokens":2}'),
        ("/v1/completions", b'{"model":"\xff","prompt":"x"}'),
        ("/generate", b'{"text":"\xc3"}'),
    ]:
        sent, metrics = await _call(_PD(), body, path)
        status, error = _error(sent)
        assert (status, error["code"]) == (400, "invalid_json")
        assert 'code="4xx"' in _requests_total(metrics)


async def test_unexpected_error_before_forwarding_is_openai_shaped_500_and_counted() -> None:
    sent, metrics = await _call(_PD(broken=True), b'{"messages": []}')
    status, error = _error(sent)
    assert (status, error["code"], error["type"]) == (500, "internal_error", "server_error")
    assert 'code="5xx"' in _requests_total(metrics)


async def test_no_model_known_yet_is_503_with_retry_after() -> None:
    sent, metrics = await _call(_PD(), b'{"messages": []}', models=())
    status, error = _error(sent)
    assert (status, error["code"]) == (503, "no_healthy_worker")
    assert (b"retry-after", b"3") in sent[0]["headers"]
    assert 'code="5xx"' in _requests_total(metrics)


class _StreamingPD(_PD):
    """Streams one event over PD and then waits, as a long decode would."""

    async def forward(self, *, send: Any, client: Any, **_: Any) -> bool:
        client.started = client.streaming = True
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        await asyncio.Event().wait()
        return True


async def test_client_leaving_mid_stream_over_pd_is_counted_client_closed() -> None:
    metrics = Metrics()
    proxy = PDProxy(_Unused(), _StreamingPD(), models=lambda: ["m"], metrics=metrics)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    got_body = asyncio.Event()
    read = False

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": b'{"messages": [], "stream": true}', "more_body": False}
        await got_body.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message.get("body"):
            got_body.set()

    await asyncio.wait_for(proxy.handle(scope, receive, send), 5)
    assert metrics.requests == {("chat", "m", "client_closed"): 1}
    assert metrics.model("m").e2e.count == 0
