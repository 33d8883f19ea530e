"""One PD request: pick a prefill and a decode target, send both legs at once, answer with decode's.

    prefill_router.route() ─┐                       ┌─▶ prefill leg (read whole; its verdict)
                            ├─ rooms ─ shape both ──┤
    decode_router.route() ──┘                       └─▶ decode leg ─▶ client (bytes as they come)

Failure rules (the regular proxy's, extended to two legs):
- the prefill leg failing (connect error, 5xx, an error or abort in a 200, no answer within
  ``prefill_timeout_s``) aborts the decode leg at once (its connection is closed, so SGLang drops
  the request instead of waiting 300 s for KV that will never come); the decode leg failing
  before its first byte aborts the prefill leg;
- either way, if the client has seen nothing, both legs are retried on a new pair with new rooms
  (the failed server excluded), at most ``retries`` times, then answered with an OpenAI-shaped
  502/503/504 naming the leg that failed;
- a 4xx from either leg is the client's fault: the other leg is aborted and the 4xx passed through;
- after the first byte of a stream, a failure ends the stream with an SSE error event and [DONE];
- a client that goes away cancels the handler, which closes both legs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec

from backends.sglang import DEFAULT_BOOTSTRAP_PORT, Bootstrap, PdRequests, shape_pd_requests
from gateway.errors import model_not_found, no_healthy_worker, upstream_failed, upstream_overloaded
from gateway.http._relay import error_detail, is_event_stream, relay_stream, send_whole
from gateway.http._usage import outcome_from_usage, usage_from_body
from gateway.metrics import Metrics
from gateway.pd._logprobs import StreamMerger, input_logprobs, merge_body
from gateway.pd._rooms import RoomAllocator
from gateway.pd._settings import PDSettings
from gateway.pd._shape import RequestShape, request_shape
from gateway.routing import NoHealthyWorker, Outcome, Route, RoutingRequest, UnknownModel
from gateway.routing._features import prompt_blocks
from gateway.upstream import (
    Transport,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
)
from policies.prefix import DEFAULT_BLOCK_BYTES, DEFAULT_BLOCK_IDS
from policies.types import Role

__all__ = ["ClientState", "EndpointLike", "PDForwarder", "PDRouterLike", "Send", "SpanLike"]

logger = logging.getLogger("cachet.gateway.pd")

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class EndpointLike(Protocol):
    """gateway.http's Endpoint: routing name (chat|completion|generate) and upstream path."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...


class ClientState(Protocol):
    """The proxy's per-request flags shared with its disconnect watcher."""

    started: bool
    streaming: bool
    completing: bool
    disconnected: bool


class SpanLike(Protocol):
    def set(self, **attributes: str | int | float | bool | None) -> None: ...


class PDWorker(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def role(self) -> Role: ...
    @property
    def dp_size(self) -> int: ...
    @property
    def version(self) -> str: ...
    @property
    def bootstrap_port(self) -> int | None: ...


class PDRegistry(Protocol):
    def workers(
        self, model: str | None = None, role: Role | None = None, healthy_only: bool = True
    ) -> Sequence[PDWorker]: ...


class PDRouterLike(Protocol):
    """gateway.routing.Router, one per role."""

    async def route(self, req: RoutingRequest) -> Route[Any]: ...

    async def finish(self, route: Route[Any], outcome: Outcome) -> None: ...

    def bytes_per_token(self, worker_url: str | None, model: str) -> float: ...

    def recent_decisions(self, limit: int) -> list[dict[str, Any]]: ...


class _LegFailed(Exception):
    """One leg failed before the client saw a byte; the pair may be replaced."""

    def __init__(
        self, role: Role, url: str, message: str, *, timeout: bool = False, status: int | None = None
    ) -> None:
        super().__init__(f"{role.value} server {url}: {message}")
        self.role = role
        self.url = url
        self.timeout = timeout
        self.status = status


def _decode_unpinned(shape: RequestShape, decode_route: Route[Any]) -> bool:
    """Whether the decode server picks the ranks itself (listed request on a multi-rank server)."""
    return shape.listed and decode_route.worker.dp_size > 1


def _failure_kind(exc: _LegFailed) -> str:
    """The gateway.metrics failure kind of a failed leg."""
    if exc.status is not None:
        return "status_5xx"
    if exc.timeout:
        return "timeout"
    if isinstance(exc.__cause__, UpstreamConnectError):
        return "connect"
    if isinstance(exc.__cause__, UpstreamError):
        return "disconnect"
    return "error_reply"  # a 200 whose body reports an error or an abort


class _PrefillAnswer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _DecodeAnswer:
    """The decode leg once it has something for the client: a whole body, or a stream's first bytes."""

    __slots__ = ("body", "chunks", "first", "response")

    def __init__(
        self,
        response: UpstreamResponse,
        *,
        body: bytes | None = None,
        chunks: AsyncIterator[bytes] | None = None,
        first: bytes = b"",
    ) -> None:
        self.response = response
        self.body = body
        self.chunks = chunks
        self.first = first


class _Final(Exception):
    """The client has been answered by a leg's 4xx; stop trying."""


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")


async def _merged(first: bytes, chunks: AsyncIterator[bytes], merger: StreamMerger) -> AsyncIterator[bytes]:
    """The decode stream with the prefill's input logprobs put in front of its own (re-framed
    events; only when the request asked for logprobs)."""
    out = merger.feed(first)
    if out:
        yield out
    async for chunk in chunks:
        out = merger.feed(chunk)
        if out:
            yield out
    out = merger.flush()
    if out:
        yield out


class _AbortProbe(msgspec.Struct):
    type: str | None = None


class _MetaProbe(msgspec.Struct):
    finish_reason: _AbortProbe | None = None


class _Probe(msgspec.Struct):
    meta_info: _MetaProbe | None = None
    error: Any = None


_PROBE = msgspec.json.Decoder(_Probe)
_PROBES = msgspec.json.Decoder(list[_Probe])


def _prefill_problem(answer: _PrefillAnswer) -> str | None:
    """Why a 200 from prefill is still a failure (an error event, an aborted request), or None."""
    body = answer.body.strip()
    if body.startswith(b"data:"):
        end = body.rfind(b"data: [DONE]")
        start = body.rfind(b"data:", 0, end if end >= 0 else len(body))
        payload = body[start + 5 : end if end >= 0 else len(body)].strip()
    else:
        payload = body
    try:
        probes = _PROBES.decode(payload) if payload.startswith(b"[") else [_PROBE.decode(payload)]
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    for probe in probes:
        if probe.error is not None:
            return f"error reported: {payload[:300].decode('utf-8', 'replace')}"
        meta = probe.meta_info
        if meta is not None and meta.finish_reason is not None and meta.finish_reason.type == "abort":
            return f"request aborted: {payload[:300].decode('utf-8', 'replace')}"
    return None


class PDForwarder:
    """Serves chat/completion/generate requests of models with prefill and decode pools.

    ``forward`` answers the client itself and returns True, or returns False without having sent
    anything when the request should take the regular path instead (conditional disaggregation, or
    the fallback to regular workers when a PD pool is down).
    """

    def __init__(
        self,
        registry: PDRegistry,
        transport: Transport,
        *,
        prefill_router: PDRouterLike,
        decode_router: PDRouterLike,
        settings: PDSettings | None = None,
        rooms: RoomAllocator | None = None,
        clock: Callable[[], float] = time.perf_counter,
        on_connect_failure: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._registry = registry
        # Routing decisions, retries and failures of the legs; the app binds the gateway's own.
        self.metrics = metrics if metrics is not None else Metrics()
        self._transport = transport
        self._prefill = prefill_router
        self._decode = decode_router
        self._settings = settings if settings is not None else PDSettings()
        self._rooms = rooms if rooms is not None else RoomAllocator()
        self._clock = clock
        self._on_connect_failure = on_connect_failure

    @property
    def settings(self) -> PDSettings:
        return self._settings

    @property
    def rooms(self) -> RoomAllocator:
        return self._rooms

    async def start(self) -> None:
        for router in (self._prefill, self._decode):
            start: Callable[[], Awaitable[None]] | None = getattr(router, "start", None)
            if start is not None:
                await start()

    async def aclose(self) -> None:
        for router in (self._prefill, self._decode):
            close: Callable[[], Awaitable[None]] | None = getattr(router, "aclose", None)
            if close is not None:
                await close()

    def recent_decisions(self, limit: int) -> dict[str, list[dict[str, Any]]]:
        """The latest prefill and decode routing decisions, newest first (for /admin)."""
        return {
            "prefill": self._prefill.recent_decisions(limit),
            "decode": self._decode.recent_decisions(limit),
        }

    def store_status(self) -> dict[str, dict[str, object]]:
        """The prefill and decode routers' state-store status (for /admin/state)."""
        status: dict[str, dict[str, object]] = {}
        for role, router in (("prefill", self._prefill), ("decode", self._decode)):
            store = getattr(router, "store", None)
            status[role] = dict(store.status()) if store is not None else {}
        return status

    def has_pools(self) -> bool:
        """Whether any prefill or decode server is configured at all (else PD has nothing to do)."""
        registry = self._registry
        return bool(
            registry.workers(role=Role.PREFILL, healthy_only=False)
            or registry.workers(role=Role.DECODE, healthy_only=False)
        )

    def serves(self, model: str) -> bool:
        """Whether ``model`` has a prefill or decode pool (healthy or not)."""
        registry = self._registry
        return bool(
            registry.workers(model=model, role=Role.PREFILL, healthy_only=False)
            or registry.workers(model=model, role=Role.DECODE, healthy_only=False)
        )

    def _has_regular(self, model: str) -> bool:
        return bool(self._registry.workers(model=model, role=Role.REGULAR, healthy_only=True))

    def _prompt_tokens(self, request: RoutingRequest) -> int:
        blocks, batch = prompt_blocks(request, block_bytes=DEFAULT_BLOCK_BYTES, block_ids=DEFAULT_BLOCK_IDS)
        if blocks.unit == "ids":
            return blocks.length * batch
        return int(blocks.length * batch / self._prefill.bytes_per_token(None, request.model)) + 1

    # -- the request -----------------------------------------------------------------------------

    async def forward(
        self,
        *,
        endpoint: EndpointLike,
        request: RoutingRequest,
        body: bytes,
        headers: list[tuple[str, str]],
        send: Send,
        client: ClientState,
        span: SpanLike | None = None,
    ) -> bool:
        """Serve ``request`` over a prefill/decode pair; see the class docstring for the result.

        Raises GatewayError (to be sent by the caller) only while the client has seen nothing.
        """
        settings = self._settings
        shape = request_shape(endpoint.name, body, request)
        excluded = {Role.PREFILL: frozenset[str](), Role.DECODE: frozenset[str]()}
        failure: _LegFailed | None = None
        for attempt in range(settings.retries + 1):
            try:
                prefill_route = await self._prefill.route(self._excluding(request, excluded[Role.PREFILL]))
            except UnknownModel:
                raise model_not_found(request.model) from None
            except NoHealthyWorker:
                if failure is not None:
                    break
                return self._pool_down(request.model, Role.PREFILL)
            if attempt == 0 and settings.direct_below_tokens > 0 and self._has_regular(request.model):
                uncached = self._prompt_tokens(request) - prefill_route.decision.predicted_cached_tokens
                if uncached < settings.direct_below_tokens:
                    # Forget the reservation (and the prefix it would have recorded there).
                    await self._finish(self._prefill, prefill_route, Outcome(ok=False))
                    if span is not None:
                        span.set(pd="direct", pd_uncached_tokens=uncached)
                    return False
            try:
                decode_route = await self._decode.route(self._excluding(request, excluded[Role.DECODE]))
            except (UnknownModel, NoHealthyWorker):
                await self._finish(self._prefill, prefill_route, Outcome(ok=False))
                if failure is not None:
                    break
                return self._pool_down(request.model, Role.DECODE)
            metrics = self.metrics
            if attempt > 0:
                metrics.model(request.model).retries += 1
            metrics.decision(
                prefill_route.decision.policy, prefill_route.worker.url, prefill_route.decision.target.dp_rank
            )
            metrics.decision(
                decode_route.decision.policy,
                decode_route.worker.url,
                None if _decode_unpinned(shape, decode_route) else decode_route.decision.target.dp_rank,
            )
            try:
                await self._pair(
                    endpoint=endpoint,
                    request=request,
                    shape=shape,
                    body=body,
                    headers=headers,
                    prefill_route=prefill_route,
                    decode_route=decode_route,
                    send=send,
                    client=client,
                    span=span,
                )
                return True
            except _Final:
                return True
            except _LegFailed as exc:
                logger.warning("PD attempt %d failed before the first byte: %s", attempt + 1, exc)
                metrics.upstream_failure(exc.url, _failure_kind(exc))
                failure = exc
                excluded[exc.role] = excluded[exc.role] | {exc.url}
        assert failure is not None
        if settings.fallback_to_regular and self._has_regular(request.model):
            logger.warning(
                "no prefill/decode pair could serve a %s request: serving it on regular workers",
                request.model,
            )
            return False
        if failure.status == 503:
            raise upstream_overloaded(
                f"All PD servers for model '{request.model}' are overloaded: {failure}",
                settings.retry_after_s,
            )
        raise upstream_failed(
            f"No prefill/decode pair could serve the request: {failure}", timeout=failure.timeout
        )

    @staticmethod
    def _excluding(request: RoutingRequest, urls: frozenset[str]) -> RoutingRequest:
        return msgspec.structs.replace(request, exclude=urls) if urls else request

    def _pool_down(self, model: str, role: Role) -> bool:
        if self._settings.fallback_to_regular and self._has_regular(model):
            logger.warning("no healthy %s server for model %s: serving on regular workers", role.value, model)
            return False
        raise no_healthy_worker(model, self._settings.retry_after_s, server=f"{role.value} server")

    async def _finish(self, router: PDRouterLike, route: Route[Any], outcome: Outcome) -> None:
        try:
            await router.finish(route, outcome)
        except Exception:
            logger.exception("router.finish failed for %s", route.worker.url)

    # -- one pair --------------------------------------------------------------------------------

    def _shape(
        self,
        *,
        endpoint: EndpointLike,
        shape: RequestShape,
        body: bytes,
        headers: list[tuple[str, str]],
        prefill_route: Route[Any],
        decode_route: Route[Any],
        rooms: tuple[int, ...],
    ) -> PdRequests:
        prefill = prefill_route.worker
        host = urlsplit(prefill.url).hostname or "127.0.0.1"
        port = prefill.bootstrap_port if prefill.bootstrap_port is not None else DEFAULT_BOOTSTRAP_PORT
        return shape_pd_requests(
            endpoint=endpoint.name,
            body=body,
            headers=headers,
            bootstrap=Bootstrap(host=host, port=port, rooms=rooms),
            prefill=prefill,
            prefill_dp_rank=prefill_route.dp_rank,
            decode=decode_route.worker,
            decode_dp_rank=decode_route.dp_rank,
            batch=shape.listed,
        )

    @staticmethod
    def _receipt(
        prefill_route: Route[Any], decode_route: Route[Any], room: int, shape: RequestShape
    ) -> list[tuple[str, str]]:
        prefill, decode = prefill_route.decision, decode_route.decision
        # A listed request (batch or n > 1) is not rank-pinned on decode: the server spreads its
        # sequences itself, so no decode rank is claimed. Its prefill sequences still land on the
        # chosen rank, by room (follow_bootstrap_room, SGLang's prefill default).
        decode_rank = (
            []
            if _decode_unpinned(shape, decode_route)
            else [("x-cachet-dp-rank", str(decode.target.dp_rank))]
        )
        return [
            ("x-cachet-worker", decode_route.worker.url),
            *decode_rank,
            ("x-cachet-prefill-worker", prefill_route.worker.url),
            ("x-cachet-prefill-dp-rank", str(prefill.target.dp_rank)),
            ("x-cachet-cached-tokens", str(prefill.predicted_cached_tokens)),
            ("x-cachet-reason", _header_safe(f"pd: prefill {prefill.reason}; decode {decode.reason}")),
            ("x-cachet-policy", f"pd:{prefill.policy}+{decode.policy}"),
            ("x-cachet-bootstrap-room", str(room)),
        ]

    async def _pair(
        self,
        *,
        endpoint: EndpointLike,
        request: RoutingRequest,
        shape: RequestShape,
        body: bytes,
        headers: list[tuple[str, str]],
        prefill_route: Route[Any],
        decode_route: Route[Any],
        send: Send,
        client: ClientState,
        span: SpanLike | None,
    ) -> None:
        prefill_worker, decode_worker = prefill_route.worker, decode_route.worker
        rooms = self._rooms.allocate(
            shape.sequences, dp_size=prefill_worker.dp_size, dp_rank=prefill_route.dp_rank
        )
        prefill_outcome = Outcome(ok=False)
        decode_outcome = Outcome(ok=False)
        loop = asyncio.get_running_loop()
        prefill_task: asyncio.Task[_PrefillAnswer] | None = None
        decode_task: asyncio.Task[_DecodeAnswer] | None = None
        began = self._clock()
        try:
            pd = self._shape(
                endpoint=endpoint,
                shape=shape,
                body=body,
                headers=headers,
                prefill_route=prefill_route,
                decode_route=decode_route,
                rooms=rooms,
            )
            if span is not None:
                span.set(
                    pd="disaggregated",
                    pd_prefill=prefill_worker.url,
                    pd_prefill_dp_rank=prefill_route.decision.target.dp_rank,
                    pd_decode=decode_worker.url,
                    pd_decode_dp_rank=decode_route.decision.target.dp_rank,
                    bootstrap_room=rooms[0],
                    predicted_cached_tokens=prefill_route.decision.predicted_cached_tokens,
                )
            path = endpoint.path
            prefill_task = loop.create_task(
                self._prefill_leg(
                    prefill_worker.url,
                    UpstreamRequest(
                        "POST", prefill_worker.url.rstrip("/") + path, pd.prefill_headers, pd.prefill_body
                    ),
                )
            )
            decode_task = loop.create_task(
                self._decode_leg(
                    decode_worker.url,
                    UpstreamRequest(
                        "POST", decode_worker.url.rstrip("/") + path, pd.decode_headers, pd.decode_body
                    ),
                )
            )
            prefill_answer, decode_answer = await self._await_legs(
                prefill_task=prefill_task,
                decode_task=decode_task,
                prefill_url=prefill_worker.url,
                decode_url=decode_worker.url,
                shape=shape,
                stream=request.stream,
            )
            receipt = self._receipt(prefill_route, decode_route, rooms[0], shape)
            if decode_answer is None:
                # Prefill said 4xx: the client's request is at fault; the decode leg is already closed.
                assert prefill_answer is not None
                await send_whole(
                    send=send,
                    client=client,
                    status=prefill_answer.status,
                    headers=prefill_answer.headers,
                    data=prefill_answer.body,
                    receipt=receipt,
                )
                prefill_outcome = Outcome(ok=False, e2e_s=self._clock() - began)
                raise _Final
            if decode_answer.body is not None:
                status = decode_answer.response.status
                if status >= 400:
                    await self._abort(prefill_task)
                    await send_whole(
                        send=send,
                        client=client,
                        status=status,
                        headers=decode_answer.response.headers,
                        data=decode_answer.body,
                        receipt=receipt,
                    )
                    raise _Final
                data = decode_answer.body
                if shape.merge_logprobs and prefill_answer is not None:
                    data = merge_body(data, input_logprobs(prefill_answer.body))
                await send_whole(
                    send=send,
                    client=client,
                    status=status,
                    headers=decode_answer.response.headers,
                    data=data,
                    receipt=receipt,
                )
                decode_outcome = outcome_from_usage(usage_from_body(data), None, self._clock() - began, span)
            else:
                first, chunks = decode_answer.first, decode_answer.chunks
                assert chunks is not None
                if shape.merge_logprobs and prefill_answer is not None:
                    merger = StreamMerger(input_logprobs(prefill_answer.body))
                    first, chunks = b"", _merged(first, chunks, merger)
                try:
                    decode_outcome = await relay_stream(
                        response=decode_answer.response,
                        first=first,
                        chunks=chunks,
                        receipt=receipt,
                        send=send,
                        client=client,
                        began=began,
                        clock=self._clock,
                        metrics=self.metrics,
                        worker_url=decode_worker.url,
                        server="decode server",
                        span=span,
                    )
                finally:
                    # Back to the pool now, not after the prefill's verdict.
                    await decode_answer.response.aclose()
            if decode_outcome.ok and decode_outcome.cached_tokens is not None:
                # The decode server reports the prefill's cached_tokens (carried with the KV), so
                # they measure the prefill router's prediction, as the regular path's do its own.
                self.metrics.model(request.model).cache_report(
                    prefill_route.decision.predicted_cached_tokens,
                    decode_outcome.cached_tokens,
                    decode_outcome.prompt_tokens,
                )
            prefill_outcome = await self._prefill_verdict(prefill_task, decode_outcome)
        finally:
            for task in (decode_task, prefill_task):
                if task is not None:
                    await self._abort(task)
            self._rooms.release(rooms)
            await self._finish(self._prefill, prefill_route, prefill_outcome)
            await self._finish(self._decode, decode_route, decode_outcome)

    async def _await_legs(
        self,
        *,
        prefill_task: asyncio.Task[_PrefillAnswer],
        decode_task: asyncio.Task[_DecodeAnswer],
        prefill_url: str,
        decode_url: str,
        shape: RequestShape,
        stream: bool,
    ) -> tuple[_PrefillAnswer | None, _DecodeAnswer | None]:
        """Wait until the decode leg has something for the client (and the prefill leg has answered,
        when its logprobs are needed). Returns (prefill answer if any, decode answer), or
        (prefill 4xx answer, None). Raises _LegFailed after aborting the other leg."""
        settings = self._settings
        deadline: float | None = self._clock() + settings.prefill_timeout_s
        prefill_answer: _PrefillAnswer | None = None
        decode_answer: _DecodeAnswer | None = None
        while True:
            waiting: set[asyncio.Task[Any]] = set()
            if prefill_answer is None:
                waiting.add(prefill_task)
            if decode_answer is None:
                waiting.add(decode_task)
            timeout = None if deadline is None else max(deadline - self._clock(), 0.0)
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                if prefill_answer is None:
                    await self._abort(decode_task)
                    raise _LegFailed(
                        Role.PREFILL,
                        prefill_url,
                        f"no answer within {settings.prefill_timeout_s:g}s",
                        timeout=True,
                    )
                await self._abort(prefill_task)
                raise _LegFailed(
                    Role.DECODE,
                    decode_url,
                    f"no first byte within {settings.first_byte_after_prefill_s:g}s of the prefill's answer",
                    timeout=True,
                )
            if prefill_task in done and prefill_answer is None:
                try:
                    prefill_answer = prefill_task.result()
                except _LegFailed:
                    await self._abort(decode_task)
                    raise
                if prefill_answer.status >= 500:
                    await self._abort(decode_task)
                    detail = prefill_answer.body[:300].decode("utf-8", "replace").strip()
                    raise _LegFailed(
                        Role.PREFILL,
                        prefill_url,
                        f"answered {prefill_answer.status}: {detail}",
                        status=prefill_answer.status,
                    )
                if prefill_answer.status >= 400:
                    await self._abort(decode_task)
                    return prefill_answer, None
                problem = _prefill_problem(prefill_answer)
                if problem is not None:
                    await self._abort(decode_task)
                    raise _LegFailed(Role.PREFILL, prefill_url, problem)
                if decode_answer is None:
                    # A stream's first byte follows the KV transfer closely; a whole body takes as
                    # long as the generation, bounded only by the transport's read timeout.
                    deadline = self._clock() + settings.first_byte_after_prefill_s if stream else None
            if decode_task in done and decode_answer is None:
                try:
                    decode_answer = decode_task.result()
                except _LegFailed:
                    await self._abort(prefill_task)
                    raise
                if decode_answer.body is not None and decode_answer.response.status >= 400:
                    return prefill_answer, decode_answer
            if decode_answer is not None and (prefill_answer is not None or not shape.merge_logprobs):
                return prefill_answer, decode_answer

    async def _prefill_leg(self, url: str, upstream: UpstreamRequest) -> _PrefillAnswer:
        try:
            response = await self._transport.send(upstream)
        except UpstreamError as exc:
            self._connect_failed(url, exc)
            raise _LegFailed(
                Role.PREFILL, url, f"{type(exc).__name__}: {exc}", timeout=isinstance(exc, UpstreamTimeout)
            ) from exc
        try:
            data = await response.aread()
        except UpstreamError as exc:
            raise _LegFailed(
                Role.PREFILL,
                url,
                f"failed while answering: {type(exc).__name__}: {exc}",
                timeout=isinstance(exc, UpstreamTimeout),
            ) from exc
        finally:
            await response.aclose()
        return _PrefillAnswer(response.status, list(response.headers), data)

    async def _decode_leg(self, url: str, upstream: UpstreamRequest) -> _DecodeAnswer:
        try:
            response = await self._transport.send(upstream)
        except UpstreamError as exc:
            self._connect_failed(url, exc)
            raise _LegFailed(
                Role.DECODE, url, f"{type(exc).__name__}: {exc}", timeout=isinstance(exc, UpstreamTimeout)
            ) from exc
        keep = False
        try:
            status = response.status
            if status >= 500:
                detail = await error_detail(response)
                raise _LegFailed(Role.DECODE, url, f"answered {status}: {detail}", status=status)
            if status >= 400 or not is_event_stream(response.headers):
                try:
                    data = await response.aread()
                except UpstreamError as exc:
                    raise _LegFailed(
                        Role.DECODE,
                        url,
                        f"failed while answering: {type(exc).__name__}: {exc}",
                        timeout=isinstance(exc, UpstreamTimeout),
                    ) from exc
                return _DecodeAnswer(response, body=data)
            chunks = response.aiter_raw()
            try:
                first = await anext(chunks, b"")
            except UpstreamError as exc:
                raise _LegFailed(
                    Role.DECODE,
                    url,
                    f"failed before its first byte: {type(exc).__name__}: {exc}",
                    timeout=isinstance(exc, UpstreamTimeout),
                ) from exc
            keep = True
            return _DecodeAnswer(response, chunks=chunks, first=first)
        finally:
            if not keep:
                await response.aclose()

    def _connect_failed(self, url: str, exc: UpstreamError) -> None:
        if isinstance(exc, UpstreamConnectError) and self._on_connect_failure is not None:
            self._on_connect_failure(url)

    @staticmethod
    async def _abort(task: asyncio.Task[Any]) -> None:
        """Stop a leg now: cancel it if still running (its connection is closed on the way out), or
        close the response it left open."""
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        if isinstance(result, _DecodeAnswer) and result.chunks is not None:
            with contextlib.suppress(Exception):
                await result.response.aclose()

    async def _prefill_verdict(self, task: asyncio.Task[_PrefillAnswer], decode: Outcome) -> Outcome:
        """The prefill leg's outcome, once the client has its answer (it is normally long done)."""
        if not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), self._settings.prefill_drain_s)
        if not task.done() or task.cancelled() or task.exception() is not None:
            if task.done() and not task.cancelled():
                logger.warning("prefill leg failed after the decode answered: %s", task.exception())
            return Outcome(ok=False)
        answer = task.result()
        ok = answer.status < 400 and _prefill_problem(answer) is None
        return Outcome(
            ok=ok,
            prompt_tokens=decode.prompt_tokens,
            cached_tokens=decode.cached_tokens,
            completion_tokens=None,
        )
