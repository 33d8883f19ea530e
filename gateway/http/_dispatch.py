"""The app's front door: the proxied paths go straight to the raw handler, the rest to litestar."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.http._asgi import Receive, Scope, Send
from gateway.http.proxy import PROXIED_PATHS, Proxy

__all__ = ["GatewayASGI"]


class GatewayASGI:
    """An ASGI app: one dict lookup per request decides between the hot path and litestar."""

    def __init__(self, proxy: Proxy, fallback: Callable[..., Awaitable[Any]]) -> None:
        self.proxy = proxy
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in PROXIED_PATHS:
            await self.proxy.handle(scope, receive, send)
            return
        await self.fallback(scope, receive, send)
