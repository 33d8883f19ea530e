"""The httptools transport's pool bookkeeping under churn: never over its limit, never leaking a slot."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.upstream import UpstreamDisconnected, UpstreamError, UpstreamRequest, make_transport
from gateway.upstream._httptools import HttptoolsTransport
from tests.gateway.upstream._server import Exchange, ScriptedServer
from tests.gateway.upstream.test_transports import HANDLERS


async def test_pool_limit_holds_under_mixed_churn() -> None:
    rng = random.Random(5)
    async with ScriptedServer(HANDLERS) as a, ScriptedServer(HANDLERS) as b, ScriptedServer(HANDLERS) as c:
        transport = make_transport("httptools", max_connections=5, connect_timeout=1.0, read_timeout=2.0)
        assert isinstance(transport, HttptoolsTransport)
        peak = 0

        async def one(i: int) -> None:
            nonlocal peak
            server = rng.choice([a, b, c])
            path = rng.choice(["/echo", "/stream", "/forever", "/gzip"])
            response = await transport.send(UpstreamRequest("POST", server.url + path, body=b"%d" % i))
            peak = max(peak, transport._open)
            try:
                if path == "/forever":
                    async for _ in response.aiter_raw():
                        break  # leave early: the connection must be dropped, its slot freed
                else:
                    await response.aread()
            finally:
                await response.aclose()

        results = await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        assert peak <= 5
        await asyncio.sleep(0.1)  # let closed connections report their loss
        idle = sum(len(q) for q in transport._idle.values())
        assert transport._open == idle  # every open connection is idle now: no slot leaked
        await transport.aclose()


async def test_cancelled_waiters_do_not_leak_slots() -> None:
    async with ScriptedServer(HANDLERS) as server:
        transport = make_transport("httptools", max_connections=1, connect_timeout=1.0, read_timeout=5.0)
        assert isinstance(transport, HttptoolsTransport)
        held = await transport.send(UpstreamRequest("POST", server.url + "/forever", body=b"{}"))
        waiters = [
            asyncio.create_task(transport.send(UpstreamRequest("POST", server.url + "/echo", body=b"x")))
            for _ in range(5)
        ]
        await asyncio.sleep(0.05)
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await held.aclose()
        await asyncio.sleep(0.05)
        response = await transport.send(UpstreamRequest("POST", server.url + "/echo", body=b"after"))
        assert await response.aread() == b"after"
        await response.aclose()
        assert transport._open == 1
        await transport.aclose()


async def test_closed_transport_refuses_new_requests() -> None:
    transport = make_transport("httptools", max_connections=1, connect_timeout=1.0, read_timeout=1.0)
    await transport.aclose()
    with pytest.raises(UpstreamError):
        await transport.send(UpstreamRequest("GET", "http://127.0.0.1:1/health"))


async def test_a_connection_dying_before_the_response_is_not_retried_by_the_transport() -> None:
    async def dies(ex: Exchange) -> None:
        ex.writer.transport.abort()
        raise ConnectionResetError

    async with ScriptedServer({"/dies": dies}) as server:
        transport = make_transport("httptools", max_connections=2, connect_timeout=1.0, read_timeout=1.0)
        # Also on a pooled connection: the server may have read the request before dying.
        with pytest.raises(UpstreamDisconnected):
            await transport.send(UpstreamRequest("POST", server.url + "/dies", body=b"x"))
        assert len(server.requests) == 1
        await transport.aclose()
