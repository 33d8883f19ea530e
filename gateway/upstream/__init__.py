"""The gateway's upstream client: a one-method seam (``Transport.send``) and its implementations.

Everything the gateway sends to an SGLang server goes through ``Transport.send``. Implementations
pass bytes through untouched (no content decoding), set TCP_NODELAY, size their pools for the
gateway's concurrency, expire idle keep-alive connections before SGLang's 5 s server-side timeout
(so a request is never written onto a connection the server is closing), and classify failures so
callers know whether a retry is safe.

    transport = make_transport(max_connections=1024, connect_timeout=2.0, read_timeout=600.0,
                               keepalive_expiry=4.0)
    response = await transport.send(UpstreamRequest("POST", url, headers, body))
    async for chunk in response.aiter_raw(): ...
    await response.aclose()
"""

from __future__ import annotations

from gateway.upstream._exceptions import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamTimeout,
)
from gateway.upstream._factory import DEFAULT_TRANSPORT, TRANSPORT_NAMES, make_transport
from gateway.upstream._models import Transport, UpstreamRequest, UpstreamResponse

__all__ = [
    "DEFAULT_TRANSPORT",
    "TRANSPORT_NAMES",
    "Transport",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamPoolTimeout",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamTimeout",
    "make_transport",
]
