"""Choosing a transport by name."""

from __future__ import annotations

import importlib

from gateway.upstream._aiohttp import AiohttpTransport
from gateway.upstream._httptools import HttptoolsTransport
from gateway.upstream._httpx import HttpxFamilyTransport
from gateway.upstream._models import Transport

TRANSPORT_NAMES = ("aiohttp", "httpx", "httpx2", "httptools")
# Fastest correct transport by loadtests/overhead/transports.py (results in docs/bench-gateway.md).
DEFAULT_TRANSPORT = "httptools"


def make_transport(
    name: str = DEFAULT_TRANSPORT,
    *,
    max_connections: int,
    connect_timeout: float,
    read_timeout: float,
    keepalive_expiry: float = 4.0,
) -> Transport:
    """Build a transport. ``keepalive_expiry`` should stay below SGLang's 5 s keep-alive."""
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    if connect_timeout <= 0 or read_timeout <= 0:
        raise ValueError("connect_timeout and read_timeout must be positive")
    if name == "aiohttp":
        return AiohttpTransport(
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            keepalive_expiry=keepalive_expiry,
        )
    if name in ("httpx", "httpx2"):
        try:
            # httpx2 is optional (the bench extra); imported only when asked for.
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"transport {name!r} needs the {name!r} package: pip install {name}") from exc
        return HttpxFamilyTransport(
            module,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            keepalive_expiry=keepalive_expiry,
        )
    if name == "httptools":
        return HttptoolsTransport(
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            keepalive_expiry=keepalive_expiry,
        )
    raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(TRANSPORT_NAMES)}")
