"""Review fixes checked over a real socket: a client that stalls mid-body gets a 408 and its
connection closed instead of holding both forever."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvicorn

from gateway.http._dispatch import GatewayASGI
from gateway.http.proxy import Proxy, ProxySettings
from tests.gateway.http._fakes import FakeResponse, Harness, worker

pytestmark = pytest.mark.timeout(30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_stalled_body_is_answered_408_and_the_connection_closed() -> None:
    harness = Harness([worker("http://10.0.0.1:30000")], lambda _r: FakeResponse(200, [b"{}"]))
    proxy = Proxy(
        router=harness.router,
        transport=harness.transport,
        models=harness.registry.models,
        settings=ProxySettings(body_read_timeout_s=0.3),
    )

    async def nothing_else(scope: object, receive: object, send: object) -> None:
        raise AssertionError("only the proxied path is used")

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            GatewayASGI(proxy, nothing_else), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"messages":'
        )
        await writer.drain()
        # Everything up to EOF: the gateway must answer and close on its own.
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        server.should_exit = True
        await serving
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in body
    assert harness.transport.requests == []
