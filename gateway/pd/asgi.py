"""PD in front of the regular proxy, as a drop-in for ``gateway.http.Proxy`` (same ``handle``).

    proxy = Proxy(router=..., transport=..., models=..., telemetry=..., settings=...)
    pd = make_pd_forwarder(registry, transport, PDSettings(...))
    app = GatewayASGI(PDProxy(proxy, pd, models=registry.models, telemetry=telemetry), litestar_app)

A request for a model without PD pools (or any request, while no PD server is configured at all)
goes to ``proxy.handle`` untouched. A request for a PD model is decoded once here and served by
``PDForwarder``; when PD sends it back (conditional disaggregation, fallback to regular workers),
the proxy gets it with its body replayed, exactly as if it had come straight from the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from gateway.errors import (
    GatewayError,
    internal_error,
    method_not_allowed,
    no_model_yet,
)
from gateway.http._asgi import (
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    fail_late,
    read_body,
    send_error,
    upstream_headers,
    watch_disconnect,
)
from gateway.http._views import decode_view
from gateway.http.proxy import PROXIED_PATHS
from gateway.metrics import Metrics
from gateway.pd._forwarder import PDForwarder
from gateway.telemetry import TRACE_HEADERS, RequestSpan, Telemetry

__all__ = ["PDProxy"]

logger = logging.getLogger("cachet.gateway.pd")


class ProxyLike(Protocol):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class _ClientState:
    __slots__ = ("completing", "disconnected", "started", "status", "streaming")

    def __init__(self) -> None:
        self.started = False
        self.streaming = False
        self.completing = False
        self.disconnected = False
        self.status = 0  # (the metrics take the status from _Answer, which sees every path's)


class _Answer:
    """The client's ``send``, noting the status and when the first body byte left (for metrics)."""

    __slots__ = ("_clock", "_send", "first_byte_at", "status")

    def __init__(self, send: Send, clock: Callable[[], float]) -> None:
        self._send = send
        self._clock = clock
        self.status = 0
        self.first_byte_at = 0.0

    async def send(self, message: Message) -> None:
        if not self.first_byte_at:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message.get("body"):
                self.first_byte_at = self._clock()
        await self._send(message)


def _with_trace(scope: Scope, trace_headers: list[tuple[str, str]]) -> Scope:
    """``scope`` with its trace headers replaced by ``trace_headers``."""
    headers = [
        (name, value) for name, value in scope["headers"] if name.decode("latin-1") not in TRACE_HEADERS
    ]
    headers.extend((name.encode("latin-1"), value.encode("latin-1")) for name, value in trace_headers)
    return {**scope, "headers": headers}


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out the already-read body first, then the client's own messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class PDProxy:
    def __init__(
        self,
        proxy: ProxyLike,
        pd: PDForwarder,
        *,
        models: Callable[[], list[str]],
        telemetry: Telemetry | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
        body_read_timeout_s: float = 30.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``metrics`` counts the requests served over PD (the proxy counts those it serves)."""
        self._proxy = proxy
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._pd = pd
        self._models = models
        self._telemetry = telemetry if telemetry is not None else Telemetry()
        self._max_body_bytes = max_body_bytes
        self._body_read_timeout_s = body_read_timeout_s

    def _default_model(self) -> str | None:
        models = self._models()
        if not models:
            raise no_model_yet(self._pd.settings.retry_after_s)
        return models[0] if len(models) == 1 else None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._pd.has_pools():
            await self._proxy.handle(scope, receive, send)
            return
        endpoint, methods = PROXIED_PATHS[scope["path"]]
        metrics = self._metrics
        if scope["method"] not in methods:
            await send_error(send, method_not_allowed(scope["method"], scope["path"], methods))
            metrics.request_done(endpoint.name, "", 405)
            return
        try:
            body = await read_body(scope, receive, self._max_body_bytes, self._body_read_timeout_s)
            request = decode_view(endpoint, body, self._default_model)
            pd_model = self._pd.serves(request.model)
        except GatewayError as bad:
            await send_error(send, bad)
            metrics.request_done(endpoint.name, "", bad.status)
            return
        except ClientGone:
            metrics.request_done(endpoint.name, "", 0)
            return
        except Exception as exc:  # a bug before forwarding still gets an OpenAI-shaped answer
            logger.exception("unexpected error while reading a request to %s", scope["path"])
            failure = internal_error(exc)
            await send_error(send, failure)
            metrics.request_done(endpoint.name, "", failure.status)
            return
        if not pd_model:
            await self._proxy.handle(scope, _replay(body, receive), send)
            return
        arrived = self._clock()
        answer = _Answer(send, self._clock)
        span: RequestSpan | None = None
        if self._telemetry.enabled:
            span = self._telemetry.start(
                endpoint.name, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            )
            span.set(model=request.model, endpoint=endpoint.name, stream=request.stream)
        headers = upstream_headers(scope, span)
        client = _ClientState()
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, client, task))
        error: str | None = None
        handled = True
        try:
            metrics.in_flight += 1
            try:
                handled = await self._pd.forward(
                    endpoint=endpoint,
                    request=request,
                    body=body,
                    headers=headers,
                    send=answer.send,
                    client=client,
                    span=span,
                )
            except GatewayError as exc:
                error = exc.message
                if not client.started:
                    await send_error(answer.send, exc)
            except asyncio.CancelledError:
                if not client.disconnected:
                    raise
                task.uncancel()
                error = "client disconnected"
            except Exception as exc:  # whatever broke, the client gets an answer
                logger.exception("unexpected error while serving %s over PD", scope["path"])
                error = f"internal error: {type(exc).__name__}"
                await fail_late(answer.send, client, internal_error(exc))
            finally:
                metrics.in_flight -= 1
                watcher.cancel()
                if handled:
                    self._count(endpoint.name, request.model, answer, arrived, client)
            if not handled:
                # Served on a regular worker after all: the proxy's span becomes a child of this
                # one (which holds the PD verdict), and the proxy counts the request.
                await self._proxy.handle(
                    scope if span is None else _with_trace(scope, span.upstream_headers()),
                    _replay(body, receive),
                    send,
                )
        finally:
            if span is not None:
                if handled:
                    span.set(status=answer.status or None)
                span.end(error=error)

    def _count(
        self, endpoint: str, model: str, answer: _Answer, arrived: float, client: _ClientState
    ) -> None:
        metrics = self._metrics
        # A client that left before its answer was complete is "client_closed" (status 0).
        status = 0 if client.disconnected else answer.status
        metrics.request_done(endpoint, model, status)
        stats = metrics.model(model)
        if client.streaming and answer.first_byte_at:
            stats.ttft.observe(answer.first_byte_at - arrived)
        if 200 <= status < 300:
            stats.e2e.observe(self._clock() - arrived)
