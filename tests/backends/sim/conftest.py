"""Simulated servers on real sockets, started in the test's event loop with a small time scale."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from backends.sim import Faults, ServerSettings, SimServer

FAST = 0.002  # real seconds per simulated second

StartServer = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """`await start_server(dp_size=2, enable_metrics=True, ...)` -> a healthy SimServer on a free port."""
    servers: list[SimServer] = []

    async def start(faults: Faults | None = None, wait: bool = True, **overrides: Any) -> SimServer:
        settings = dataclasses.replace(ServerSettings(time_scale=FAST), **overrides)
        server = SimServer(settings, faults)
        servers.append(server)
        await server.start()
        if wait:
            await server.wait_ready(30)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(start_server: StartServer) -> SimServer:
    return await start_server(dp_size=2, enable_metrics=True, enable_cache_report=True)


@pytest.fixture
async def client(server: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as c:
        yield c


def sse_events(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    assert raw.endswith(b"\n\n"), raw[-40:]
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block[:40]
        out.append(block[len(b"data: ") :])
    return out
