"""The hot path: one raw ASGI handler per proxied endpoint.

    body bytes ─▶ routing view ─▶ router.route() ─▶ backends.sglang.shape_request() ─▶ transport.send()
         ◀── upstream bytes, unchanged, plus receipt headers ◀──┘        router.finish(outcome) ◀─┘

Nothing here goes through the web framework: per request there is one body decode (the routing
view), one routing call, one upstream exchange whose bytes are forwarded as they arrive, and one
decode of the final event or body for token counts. Everything else was resolved at start-up.

Failure rules:
- before the client has seen a byte (connect error, timeout before headers, a 5xx status, a
  connection lost before the first body byte) the request is retried on another server, at most
  ``retries`` times, then answered with an OpenAI-shaped 502/503/504;
- after the first byte of a stream, the stream is ended with an SSE error event and ``[DONE]``;
- an upstream 4xx is passed through unchanged;
- a client that goes away closes the upstream response at once, so SGLang aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import msgspec

from backends.sglang import shape_request
from gateway.errors import (
    GatewayError,
    internal_error,
    method_not_allowed,
    model_not_found,
    no_healthy_worker,
    no_model_yet,
    upstream_failed,
    upstream_overloaded,
)
from gateway.http._asgi import (
    ClientGone,
    Receive,
    Scope,
    Send,
    fail_late,
    read_body,
    send_error,
    upstream_headers,
    watch_disconnect,
)
from gateway.http._relay import error_detail, is_event_stream, relay_stream, send_whole
from gateway.http._usage import outcome_from_usage, usage_from_body
from gateway.http._views import CHAT, COMPLETION, GENERATE, Endpoint, decode_view, is_batch
from gateway.metrics import Metrics, ModelMetrics
from gateway.routing import NoHealthyWorker, Outcome, Route, RoutingRequest, UnknownModel
from gateway.telemetry import RequestSpan, Telemetry
from gateway.upstream import (
    Transport,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
)

__all__ = ["PROXIED_PATHS", "Proxy", "ProxySettings", "RouterLike"]

logger = logging.getLogger("cachet.gateway.proxy")


class RouterLike(Protocol):
    """What the proxy needs of gateway.routing.Router."""

    async def route(self, req: RoutingRequest) -> Route[Any]: ...

    async def finish(self, route: Route[Any], outcome: Outcome) -> None: ...

    def recent_decisions(self, limit: int) -> list[dict[str, Any]]: ...


class ProxySettings(msgspec.Struct, frozen=True):
    max_body_bytes: int = 4 * 1024 * 1024
    retries: int = 2
    retry_after_s: int = 2
    # The whole request body must arrive within this (else 408): 4 MiB in 30 s is 140 kB/s.
    body_read_timeout_s: float = 30.0


PROXIED_PATHS: dict[str, tuple[Endpoint, tuple[str, ...]]] = {
    CHAT.path: (CHAT, ("POST",)),
    COMPLETION.path: (COMPLETION, ("POST",)),
    GENERATE.path: (GENERATE, ("POST", "PUT")),
}


class _Exchange:
    """Per-request state shared with the disconnect watcher, and what the metrics count."""

    __slots__ = ("arrived", "completing", "disconnected", "model", "started", "status", "streaming")

    def __init__(self, arrived: float) -> None:
        self.started = False
        self.streaming = False
        self.completing = False
        self.disconnected = False
        self.arrived = arrived
        # The status the client was answered with (0: none, it left first) and the model label:
        # empty until the model is known to be served, so client-chosen names make no series.
        self.status = 0
        self.model = ""


class _UpstreamFailed(Exception):
    """One attempt failed before the client saw a byte; another server may be tried."""

    def __init__(self, message: str, *, kind: str, timeout: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.timeout = timeout
        self.status = status


def _failure_kind(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamConnectError):
        return "connect"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    return "disconnect"


class Proxy:
    """Routes and forwards the OpenAI and native generation endpoints."""

    def __init__(
        self,
        *,
        router: RouterLike,
        transport: Transport,
        models: Callable[[], list[str]],
        telemetry: Telemetry | None = None,
        settings: ProxySettings | None = None,
        clock: Callable[[], float] = time.perf_counter,
        on_connect_failure: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``on_connect_failure(url)`` hears of every server that could not be reached (the
        registry counts it toward taking the server out before its next health check)."""
        self._on_connect_failure = on_connect_failure
        self._router = router
        self._transport = transport
        self._models = models
        self._telemetry = telemetry if telemetry is not None else Telemetry()
        self._tracing = self._telemetry.enabled
        self._settings = settings if settings is not None else ProxySettings()
        self._clock = clock
        self._metrics = metrics if metrics is not None else Metrics()

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def _default_model(self) -> str | None:
        models = self._models()
        if not models:
            raise no_model_yet(self._settings.retry_after_s)
        return models[0] if len(models) == 1 else None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve ``scope["path"]``, which must be one of PROXIED_PATHS."""
        endpoint, methods = PROXIED_PATHS[scope["path"]]
        exchange = _Exchange(self._clock())
        metrics = self._metrics
        metrics.in_flight += 1
        try:
            await self._handle(
                endpoint=endpoint, methods=methods, scope=scope, receive=receive, send=send, exchange=exchange
            )
        finally:
            metrics.in_flight -= 1
            # A client that left before its answer was complete is "client_closed", whatever
            # status its (partial) answer had started with.
            status = 0 if exchange.disconnected else exchange.status
            metrics.request_done(endpoint.name, exchange.model, status)

    async def _handle(
        self,
        *,
        endpoint: Endpoint,
        methods: tuple[str, ...],
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: _Exchange,
    ) -> None:
        if scope["method"] not in methods:
            await self._send_error(
                send, exchange, method_not_allowed(scope["method"], scope["path"], methods)
            )
            return
        try:
            body = await read_body(
                scope, receive, self._settings.max_body_bytes, self._settings.body_read_timeout_s
            )
            request = decode_view(endpoint, body, self._default_model)
        except GatewayError as error:
            await self._send_error(send, exchange, error)
            return
        except ClientGone:
            return
        except Exception as exc:  # a bug before routing still gets an OpenAI-shaped answer
            logger.exception("unexpected error while reading a request to %s", scope["path"])
            await self._send_error(send, exchange, internal_error(exc))
            return
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, exchange, task))
        try:
            await self._proxy(
                endpoint=endpoint, scope=scope, request=request, body=body, send=send, exchange=exchange
            )
        except asyncio.CancelledError:
            if not exchange.disconnected:
                raise
            task.uncancel()
        except Exception as exc:  # the catch-all: whatever broke, the client gets an answer
            logger.exception("unexpected error while proxying %s", scope["path"])
            await fail_late(send, exchange, internal_error(exc))
        finally:
            watcher.cancel()

    @staticmethod
    async def _send_error(send: Send, exchange: _Exchange, error: GatewayError) -> None:
        exchange.status = error.status
        await send_error(send, error)

    async def _proxy(
        self,
        *,
        endpoint: Endpoint,
        scope: Scope,
        request: RoutingRequest,
        body: bytes,
        send: Send,
        exchange: _Exchange,
    ) -> None:
        # No span object at all while tracing is off: the request pays one attribute test per hook.
        span: RequestSpan | None = None
        if self._tracing:
            span = self._telemetry.start(
                endpoint.name, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            )
            span.set(model=request.model, endpoint=endpoint.name, stream=request.stream)
        headers = upstream_headers(scope, span)
        batch = endpoint is GENERATE and is_batch(request)
        failure: _UpstreamFailed | None = None
        excluded: frozenset[str] = frozenset()
        error: str | None = None
        metrics = self._metrics
        stats: ModelMetrics | None = None
        try:
            for _attempt in range(self._settings.retries + 1):
                routed = request if not excluded else msgspec.structs.replace(request, exclude=excluded)
                try:
                    route = await self._router.route(routed)
                except UnknownModel:
                    raise model_not_found(request.model) from None
                except NoHealthyWorker:
                    exchange.model = request.model  # a served model: the router knows it
                    if failure is not None:
                        break
                    raise no_healthy_worker(request.model, self._settings.retry_after_s) from None
                if stats is None:
                    exchange.model = request.model
                    stats = metrics.model(request.model)
                else:
                    stats.retries += 1
                decision = route.decision
                # route.dp_rank is None for a single-rank server and for an unpinned batch.
                unpinned = route.dp_rank is None and route.worker.dp_size > 1
                metrics.decision(
                    decision.policy, route.worker.url, None if unpinned else decision.target.dp_rank
                )
                if span is not None:
                    span.set(
                        worker=route.worker.url,
                        dp_rank=route.dp_rank,
                        policy=route.decision.policy,
                        reason=route.decision.reason,
                        predicted_cached_tokens=route.decision.predicted_cached_tokens,
                    )
                try:
                    await self._exchange(
                        endpoint=endpoint,
                        route=route,
                        body=body,
                        headers=headers,
                        batch=batch,
                        send=send,
                        exchange=exchange,
                        span=span,
                        stats=stats,
                    )
                    return
                except _UpstreamFailed as exc:
                    logger.warning("upstream %s failed before the first byte: %s", route.worker.url, exc)
                    metrics.upstream_failure(route.worker.url, exc.kind)
                    failure = exc
                    excluded = excluded | {route.worker.url}
            assert failure is not None
            if failure.status == 503:
                raise upstream_overloaded(
                    f"All servers for model '{request.model}' are overloaded: {failure}",
                    self._settings.retry_after_s,
                )
            raise upstream_failed(f"No server could serve the request: {failure}", timeout=failure.timeout)
        except GatewayError as exc:
            error = exc.message
            await fail_late(send, exchange, exc)
        finally:
            if span is not None:
                span.set(status=exchange.status or None)
                span.end(error=error)

    async def _exchange(
        self,
        *,
        endpoint: Endpoint,
        route: Route[Any],
        body: bytes,
        headers: list[tuple[str, str]],
        batch: bool,
        send: Send,
        exchange: _Exchange,
        span: RequestSpan | None,
        stats: ModelMetrics,
    ) -> None:
        """One attempt on ``route``. Raises _UpstreamFailed if the client has seen nothing yet."""
        worker = route.worker
        # A batch on a multi-rank server is unpinned by the router (route.dp_rank None, no rank
        # in the receipt): the server spreads it over its ranks itself.
        receipt = route.receipt_headers
        outcome = Outcome(ok=False)
        began = self._clock()
        response: UpstreamResponse | None = None
        try:
            shaped_body, shaped_headers = shape_request(worker, endpoint.name, body, headers, route.dp_rank)
            url = worker.url.rstrip("/") + endpoint.path
            try:
                response = await self._transport.send(
                    UpstreamRequest("POST", url, shaped_headers, shaped_body)
                )
            except UpstreamError as exc:
                if isinstance(exc, UpstreamConnectError) and self._on_connect_failure is not None:
                    self._on_connect_failure(worker.url)
                raise _UpstreamFailed(
                    f"{worker.url}: {type(exc).__name__}: {exc}",
                    kind=_failure_kind(exc),
                    timeout=isinstance(exc, UpstreamTimeout),
                ) from exc
            status = response.status
            if status >= 500:
                detail = await error_detail(response)
                raise _UpstreamFailed(
                    f"{worker.url} answered {status}: {detail}", kind="status_5xx", status=status
                )
            if status >= 400 or not is_event_stream(response.headers):
                outcome = await self._forward_whole(
                    response=response,
                    worker_url=worker.url,
                    receipt=receipt,
                    send=send,
                    exchange=exchange,
                    began=began,
                    span=span,
                )
            else:
                outcome = await self._forward_stream(
                    response=response,
                    worker_url=worker.url,
                    receipt=receipt,
                    send=send,
                    exchange=exchange,
                    began=began,
                    span=span,
                    stats=stats,
                )
            if outcome.ok:
                stats.e2e.observe(self._clock() - exchange.arrived)
                if outcome.cached_tokens is not None:
                    stats.cache_report(
                        route.decision.predicted_cached_tokens, outcome.cached_tokens, outcome.prompt_tokens
                    )
        finally:
            if response is not None:
                await response.aclose()
            try:
                await self._router.finish(route, outcome)
            except Exception:
                logger.exception("router.finish failed for %s", worker.url)

    async def _forward_whole(
        self,
        *,
        response: UpstreamResponse,
        worker_url: str,
        receipt: list[tuple[str, str]],
        send: Send,
        exchange: _Exchange,
        began: float,
        span: RequestSpan | None,
    ) -> Outcome:
        try:
            data = await response.aread()
        except UpstreamError as exc:
            # The whole body is buffered, so the client has still seen nothing: fail cleanly.
            self._metrics.upstream_failure(worker_url, _failure_kind(exc))
            raise upstream_failed(
                f"{worker_url} failed while sending its response: {type(exc).__name__}: {exc}",
                timeout=isinstance(exc, UpstreamTimeout),
            ) from exc
        status = response.status
        exchange.status = status
        await send_whole(
            send=send, client=exchange, status=status, headers=response.headers, data=data, receipt=receipt
        )
        if status >= 300:
            return Outcome(ok=False, e2e_s=self._clock() - began)
        usage = usage_from_body(data)
        return outcome_from_usage(usage, None, self._clock() - began, span)

    async def _forward_stream(
        self,
        *,
        response: UpstreamResponse,
        worker_url: str,
        receipt: list[tuple[str, str]],
        send: Send,
        exchange: _Exchange,
        began: float,
        span: RequestSpan | None,
        stats: ModelMetrics,
    ) -> Outcome:
        chunks: AsyncIterator[bytes] = response.aiter_raw()
        # Wait for the first body byte before answering: a server that dies before it can still be
        # replaced by another without the client noticing.
        try:
            first = await anext(chunks, b"")
        except UpstreamError as exc:
            raise _UpstreamFailed(
                f"{worker_url} failed before its first byte: {type(exc).__name__}: {exc}",
                kind=_failure_kind(exc),
                timeout=isinstance(exc, UpstreamTimeout),
            ) from exc
        exchange.status = response.status
        return await relay_stream(
            response=response,
            first=first,
            chunks=chunks,
            receipt=receipt,
            send=send,
            client=exchange,
            began=began,
            clock=self._clock,
            metrics=self._metrics,
            worker_url=worker_url,
            server="server",
            span=span,
            ttft=stats.ttft,
            arrived=exchange.arrived,
        )
