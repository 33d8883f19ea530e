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
from collections.abc import Callable
from typing import Any, Protocol

from gateway.errors import GatewayError, internal_error, method_not_allowed, sse_error_event
from gateway.http._asgi import ClientGone, Message, Receive, Scope, Send, read_body, send_error
from gateway.http._views import decode_view
from gateway.http.proxy import PROXIED_PATHS
from gateway.pd._forwarder import PDForwarder
from gateway.telemetry import Telemetry

__all__ = ["PDProxy"]

logger = logging.getLogger("cachet.gateway.pd")

_DROPPED_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"content-length",
        b"content-type",
        b"expect",
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"x-data-parallel-rank",
    }
)


class ProxyLike(Protocol):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class _ClientState:
    __slots__ = ("completing", "disconnected", "started", "streaming")

    def __init__(self) -> None:
        self.started = False
        self.streaming = False
        self.completing = False
        self.disconnected = False


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
    ) -> None:
        self._proxy = proxy
        self._pd = pd
        self._models = models
        self._telemetry = telemetry if telemetry is not None else Telemetry()
        self._max_body_bytes = max_body_bytes

    def _default_model(self) -> str | None:
        models = self._models()
        return models[0] if len(models) == 1 else None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._pd.has_pools():
            await self._proxy.handle(scope, receive, send)
            return
        endpoint, methods = PROXIED_PATHS[scope["path"]]
        if scope["method"] not in methods:
            await send_error(send, method_not_allowed(scope["method"], scope["path"], methods))
            return
        try:
            body = await read_body(scope, receive, self._max_body_bytes)
            request = decode_view(endpoint, body, self._default_model)
        except GatewayError as bad:
            await send_error(send, bad)
            return
        except ClientGone:
            return
        if not self._pd.serves(request.model):
            await self._proxy.handle(scope, _replay(body, receive), send)
            return
        span = self._telemetry.start(
            endpoint.name,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            if self._telemetry.enabled
            else (),
        )
        span.set(model=request.model, endpoint=endpoint.name, stream=request.stream)
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope["headers"]
            if name not in _DROPPED_REQUEST_HEADERS
        ]
        headers.append(("content-type", "application/json"))
        headers.extend(span.upstream_headers())
        client = _ClientState()
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, client, task))
        error: str | None = None
        handled = True
        try:
            handled = await self._pd.forward(
                endpoint=endpoint,
                request=request,
                body=body,
                headers=headers,
                send=send,
                client=client,
                span=span,
            )
        except GatewayError as exc:
            error = exc.message
            if not client.started:
                await send_error(send, exc)
        except asyncio.CancelledError:
            if not client.disconnected:
                raise
            task.uncancel()
            error = "client disconnected"
        except Exception as exc:  # whatever broke, the client gets an answer
            logger.exception("unexpected error while serving %s over PD", scope["path"])
            error = f"internal error: {type(exc).__name__}"
            await self._fail_late(send, client, internal_error(exc))
        finally:
            watcher.cancel()
            span.end(error=error)
        if not handled:
            await self._proxy.handle(scope, _replay(body, receive), send)

    @staticmethod
    async def _watch(receive: Receive, client: _ClientState, task: asyncio.Task[Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not client.completing:
                    client.disconnected = True
                    task.cancel()
                return

    @staticmethod
    async def _fail_late(send: Send, client: _ClientState, error: GatewayError) -> None:
        if client.disconnected:
            return
        if not client.started:
            await send_error(send, error)
        elif client.streaming and not client.completing:
            client.completing = True
            await send(
                {
                    "type": "http.response.body",
                    "body": sse_error_event(error.message, error.type, error.code),
                    "more_body": False,
                }
            )
