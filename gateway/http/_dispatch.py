"""The app's front door: the proxied paths go straight to the raw handler, the rest to litestar."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from gateway.http._asgi import Receive, Scope, Send
from gateway.http.proxy import PROXIED_PATHS

__all__ = ["GatewayASGI"]


class HotPath(Protocol):
    """What serves the proxied paths: gateway.http.Proxy, or gateway.pd.asgi.PDProxy in front of it."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class GatewayASGI:
    """An ASGI app: one dict lookup per request decides between the hot path and litestar."""

    def __init__(self, proxy: HotPath, fallback: Callable[..., Awaitable[Any]]) -> None:
        self.proxy = proxy
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in PROXIED_PATHS:
            await self.proxy.handle(scope, receive, send)
            return
        await self.fallback(scope, receive, send)
