"""Upstream failures, classified by what the caller may safely do next."""

from __future__ import annotations


class UpstreamError(Exception):
    """Any failure talking to an upstream server."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, unresolvable, connect timeout, pool exhausted).

    Nothing was sent, so the server cannot have started the request: retrying elsewhere is safe.
    """


class UpstreamTimeout(UpstreamError):
    """The server stopped answering (no headers or no body bytes within the read timeout)."""


class UpstreamConnectTimeout(UpstreamConnectError, UpstreamTimeout):
    """Connecting (or waiting for a pooled connection) took longer than allowed; nothing was sent."""


class UpstreamPoolTimeout(UpstreamConnectTimeout):
    """Every pooled connection stayed busy for the whole wait: the gateway, not the server, is saturated.

    Nothing was sent. (The aiohttp transport cannot tell this apart from a slow connect and raises
    UpstreamConnectTimeout for both.)
    """


class UpstreamDisconnected(UpstreamError):
    """The connection died after the request may have reached the server (not safe to retry blindly)."""
