"""The raw ASGI exchange: client disconnects, tracing, and the app's lifespan."""

from __future__ import annotations

import asyncio
from typing import Any

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import Gateway, create_app
from gateway.telemetry import Telemetry
from tests.gateway.http._fakes import FakeResponse, Harness, worker

A = "http://10.0.0.1:30000"
BODY = (
    b'{"model": "deepseek-ai/DeepSeek-V3", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
)


class Client:
    """Drives one request through the ASGI app by hand, so the test decides when the client leaves."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent: list[dict[str, Any]] = []
        self.leave = asyncio.Event()
        self.got_body = asyncio.Event()
        self._body_read = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.got_body.set()


def scope(path: str = "/v1/chat/completions") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [
            (b"content-type", b"application/json"),
            (b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
        ],
    }


async def test_client_leaving_mid_stream_closes_upstream_at_once() -> None:
    hanging = FakeResponse(200, [b'data: {"x": 1}\n\n'], content_type="text/event-stream", hang=True)
    harness = Harness([worker(A)], lambda _request: hanging)
    client = Client(BODY)
    serving = asyncio.create_task(harness.app(scope(), client.receive, client.send))
    await asyncio.wait_for(client.got_body.wait(), 5)
    client.leave.set()
    await asyncio.wait_for(serving, 5)  # returns promptly instead of waiting on the upstream
    assert hanging.closed
    [(_, outcome)] = harness.router.outcomes
    assert outcome.ok is False
    assert not serving.cancelled()
    # A stream cut short by its client is no 2xx in the request counter.
    assert harness.gateway.metrics.requests == {("chat", "deepseek-ai/DeepSeek-V3", "client_closed"): 1}


async def test_client_leaving_before_headers_closes_upstream() -> None:
    class Slow:
        def __init__(self) -> None:
            self.closed = False
            self.status = 200
            self.headers = [("content-type", "application/json")]

        async def aiter_raw(self) -> Any:
            await asyncio.Event().wait()
            yield b""

        async def aread(self) -> bytes:
            await asyncio.Event().wait()
            return b""

        async def aclose(self) -> None:
            self.closed = True

    slow = Slow()
    harness = Harness([worker(A)], lambda _request: slow)  # type: ignore[arg-type, return-value]
    client = Client(BODY.replace(b"true", b"false"))
    serving = asyncio.create_task(harness.app(scope(), client.receive, client.send))
    await asyncio.sleep(0.05)
    client.leave.set()
    await asyncio.wait_for(serving, 5)
    assert slow.closed
    assert client.sent == []  # nothing is written to a client that is gone


async def test_each_request_is_one_span_parented_on_traceparent() -> None:
    exporter = InMemorySpanExporter()
    harness = Harness(
        [worker(A, dp_size=2)], lambda _request: FakeResponse(200, [b'{"usage": {"prompt_tokens": 3}}'])
    )
    gateway = Gateway(
        harness.config,
        transport=harness.transport,
        registry=harness.registry,
        router=harness.router,
        telemetry=Telemetry(processor=SimpleSpanProcessor(exporter)),
    )
    app = create_app(gateway)
    client = Client(BODY.replace(b"true", b"false"))
    await app(scope(), client.receive, client.send)
    [span] = exporter.get_finished_spans()
    assert span.name == "chat"
    assert span.parent is not None and span.parent.trace_id == int("1" * 32, 16)
    assert span.attributes is not None
    assert span.attributes["cachet.worker"] == A
    assert span.attributes["cachet.prompt_tokens"] == 3
    sent_headers = dict((k.lower(), v) for k, v in harness.transport.requests[0].headers)
    assert sent_headers["traceparent"].startswith("00-" + "1" * 32)


async def test_lifespan_starts_and_stops_components() -> None:
    events: list[str] = []
    harness = Harness([worker(A)], lambda _request: FakeResponse(200, [b"{}"]))

    async def start() -> None:
        events.append("registry.start")

    async def stop() -> None:
        events.append("registry.stop")

    harness.registry.start = start  # type: ignore[method-assign]
    harness.registry.stop = stop  # type: ignore[method-assign]
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    replies: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        replies.append(message)

    await harness.app({"type": "lifespan", "state": {}}, receive, send)
    assert [r["type"] for r in replies] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == ["registry.start", "registry.stop"]
