"""The upstream seam's vocabulary: one request type, one response protocol, one transport protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import msgspec


class UpstreamRequest(msgspec.Struct):
    """A request to send upstream as is: the body is bytes the caller already shaped.

    ``timeout`` overrides the transport's read timeout for this one request (health checks and
    discovery want a short one; a long non-streamed generation wants a long one).
    """

    method: str
    url: str
    headers: list[tuple[str, str]] = []
    body: bytes = b""
    timeout: float | None = None


class UpstreamResponse(Protocol):
    """An upstream response whose headers have arrived and whose body has not yet been read.

    ``headers`` never contains hop-by-hop headers (connection, keep-alive, transfer-encoding...):
    the body bytes are already de-chunked, so those headers describe nothing the caller forwards.
    """

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> list[tuple[str, str]]: ...

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, without content decoding. Raises UpstreamDisconnected or
        UpstreamTimeout if the connection dies or stalls mid-body."""
        ...

    async def aread(self) -> bytes:
        """The whole remaining body, without content decoding."""
        ...

    async def aclose(self) -> None:
        """Release the response. If the body was not read to the end the connection is closed, not
        pooled, so the server sees the disconnect (SGLang then aborts the request)."""
        ...


class Transport(Protocol):
    """The one-method seam between the gateway and its upstream servers."""

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send the request and return once the response headers have arrived.

        Raises UpstreamConnectError when nothing was sent (safe to retry elsewhere), UpstreamTimeout
        when the server stalls, UpstreamDisconnected when the connection dies after the request may
        have reached the server.
        """
        ...

    async def aclose(self) -> None: ...
