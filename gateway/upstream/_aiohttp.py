"""The aiohttp transport: aiohttp's C-accelerated HTTP/1.1 parser behind the seam."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from gateway.upstream._exceptions import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.upstream._headers import request_headers, response_headers
from gateway.upstream._models import UpstreamRequest, UpstreamResponse

# aiohttp adds these on its own unless told not to; a proxy forwards what the client sent, nothing more.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _translate(exc: BaseException, *, sending: bool) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout(str(exc) or "timed out connecting")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.InvalidURL):
        return UpstreamConnectError(str(exc) or type(exc).__name__)
    if isinstance(exc, asyncio.TimeoutError):
        # SocketTimeoutError (sock_read) and anything else that timed out after connecting.
        return UpstreamTimeout(str(exc) or "timed out reading")
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        what = "before the response" if sending else "mid-response"
        return UpstreamDisconnected(f"connection lost {what}: {exc or type(exc).__name__}")
    return UpstreamError(str(exc) or type(exc).__name__)


class _AiohttpResponse:
    __slots__ = ("_headers", "_response", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status: int = response.status
        self._headers: list[tuple[str, str]] | None = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self._headers is None:
            self._headers = response_headers(self._response.raw_headers)
        return self._headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc, sending=False) from exc

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc, sending=False) from exc

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            # Closing (not releasing) drops the socket, so the server sees the client leave.
            self._response.close()


class AiohttpTransport:
    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_expiry: float,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._timeout = self._client_timeout(read_timeout)
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def _client_timeout(self, read_timeout: float) -> aiohttp.ClientTimeout:
        # connect covers waiting for a pooled connection too; sock_read bounds the wait for headers
        # and the gap between body chunks, never the length of a long stream.
        return aiohttp.ClientTimeout(
            total=None,
            connect=self._connect_timeout + read_timeout,
            sock_connect=self._connect_timeout,
            sock_read=read_timeout,
        )

    def _session_for_loop(self) -> aiohttp.ClientSession:
        # aiohttp sessions bind to the running loop, so the session is made on first use, not in __init__.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_expiry,
                ttl_dns_cache=300,
                use_dns_cache=True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO_HEADERS,
            )
        return self._session

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        session = self._session_for_loop()
        timeout = self._timeout if request.timeout is None else self._client_timeout(request.timeout)
        try:
            response = await session.request(
                request.method,
                request.url,
                headers=request_headers(request.headers),
                data=request.body or None,
                timeout=timeout,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc, sending=True) from exc
        except ValueError as exc:
            raise UpstreamConnectError(f"invalid upstream request {request.url!r}: {exc}") from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
