"""The httpx family of transports (httpx and its successor httpx2 share one API).

The client layer (cookies, redirects, auth, event hooks) is skipped: requests go straight to the
connection pool transport, which is all a proxy needs.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

from gateway.upstream._exceptions import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamTimeout,
)
from gateway.upstream._headers import request_headers, response_headers
from gateway.upstream._models import UpstreamRequest, UpstreamResponse

_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _translate(module: Any, exc: BaseException, *, sending: bool) -> UpstreamError:
    """Map an httpx(2) exception to the seam's classification."""
    if isinstance(exc, module.PoolTimeout):
        return UpstreamPoolTimeout(str(exc) or "no free upstream connection")
    if isinstance(exc, module.ConnectTimeout):
        return UpstreamConnectTimeout(str(exc) or type(exc).__name__)
    if isinstance(exc, module.LocalProtocolError):
        # h11 refused to write the request (e.g. a line break in a header): nothing went out.
        return UpstreamConnectError(f"invalid upstream request: {exc}")
    if isinstance(exc, module.ConnectError | module.UnsupportedProtocol):
        return UpstreamConnectError(str(exc) or type(exc).__name__)
    if isinstance(exc, module.TimeoutException):
        return UpstreamTimeout(str(exc) or type(exc).__name__)
    if isinstance(exc, module.TransportError):
        what = "before the response" if sending else "mid-response"
        return UpstreamDisconnected(f"connection lost {what}: {exc or type(exc).__name__}")
    return UpstreamError(str(exc) or type(exc).__name__)


class _HttpxResponse:
    __slots__ = ("_done", "_headers", "_module", "_response", "status")

    def __init__(self, module: Any, response: Any) -> None:
        self._module = module
        self._response = response
        self.status: int = response.status_code
        self._headers: list[tuple[str, str]] | None = None
        self._done = False

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self._headers is None:
            self._headers = response_headers(self._response.headers.raw)
        return self._headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.stream:
                yield chunk
        except self._module.HTTPError as exc:
            raise _translate(self._module, exc, sending=False) from exc
        self._done = True

    async def aread(self) -> bytes:
        parts = [chunk async for chunk in self.aiter_raw()]
        return b"".join(parts)

    async def aclose(self) -> None:
        # httpcore closes (rather than pools) a connection whose response was not read to the end.
        await self._response.stream.aclose()


class HttpxFamilyTransport:
    """A transport over ``module.AsyncHTTPTransport`` for module in {httpx, httpx2}."""

    def __init__(
        self,
        module: ModuleType,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_expiry: float,
    ) -> None:
        self._module: Any = module
        limits = self._module.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
        )
        self._pool = self._module.AsyncHTTPTransport(
            limits=limits, socket_options=_NODELAY, trust_env=False, retries=0
        )
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._timeouts = self._timeout_extension(read_timeout)

    def _timeout_extension(self, read_timeout: float) -> dict[str, float]:
        # Waiting for a free pooled connection counts as connecting: nothing has been sent yet.
        return {
            "connect": self._connect_timeout,
            "pool": self._connect_timeout + read_timeout,
            "read": read_timeout,
            "write": read_timeout,
        }

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        timeouts = self._timeouts if request.timeout is None else self._timeout_extension(request.timeout)
        try:
            outgoing = self._module.Request(
                request.method,
                request.url,
                headers=request_headers(request.headers),
                content=request.body,
                extensions={"timeout": timeouts},
            )
        except self._module.InvalidURL as exc:
            raise UpstreamConnectError(f"invalid upstream URL {request.url!r}: {exc}") from exc
        try:
            response = await self._pool.handle_async_request(outgoing)
        except self._module.HTTPError as exc:
            raise _translate(self._module, exc, sending=True) from exc
        return _HttpxResponse(self._module, response)

    async def aclose(self) -> None:
        await self._pool.aclose()
