"""Every transport against a real local server: raw bytes, streaming, abort on close, error classes."""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
from collections.abc import AsyncIterator

import pytest

from gateway.upstream import (
    TRANSPORT_NAMES,
    Transport,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamPoolTimeout,
    UpstreamRequest,
    UpstreamTimeout,
    make_transport,
)
from tests.gateway.upstream._server import Exchange, ScriptedServer, chunk, closed_port, plain

GZIPPED = gzip.compress(b'{"hello": "world"}' * 10)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def echo(ex: Exchange) -> None:
    ex.writer.write(plain(ex.body, ("content-type", "application/json"), ("x-method", ex.method)))


async def gzipped(ex: Exchange) -> None:
    ex.writer.write(plain(GZIPPED, ("content-encoding", "gzip"), ("connection", "keep-alive")))


async def stream_three(ex: Exchange) -> None:
    ex.writer.write(STREAM_HEAD)
    for i in range(3):
        ex.writer.write(chunk(b"data: %d\n\n" % i))
        await ex.writer.drain()
        await asyncio.sleep(0.01)
    ex.writer.write(b"0\r\n\r\n")


async def stream_forever(ex: Exchange) -> None:
    ex.writer.write(STREAM_HEAD + chunk(b"data: first\n\n"))
    await ex.writer.drain()
    while True:
        await asyncio.sleep(0.02)
        ex.writer.write(chunk(b"data: more\n\n"))
        await ex.writer.drain()


async def die_mid_body(ex: Exchange) -> None:
    ex.writer.write(STREAM_HEAD + chunk(b"data: partial\n\n"))
    await ex.writer.drain()
    ex.writer.transport.abort()
    raise ConnectionResetError


async def die_before_response(ex: Exchange) -> None:
    ex.writer.transport.abort()
    raise ConnectionResetError


async def hang(ex: Exchange) -> None:
    await asyncio.sleep(30)


async def stall_mid_body(ex: Exchange) -> None:
    ex.writer.write(STREAM_HEAD + chunk(b"data: first\n\n"))
    await ex.writer.drain()
    await asyncio.sleep(30)


BIG = bytes(range(256)) * 8192  # 2 MiB: more than any transport buffers at once


async def big(ex: Exchange) -> None:
    ex.writer.write(plain(BIG, ("content-type", "application/octet-stream")))


async def until_close(ex: Exchange) -> None:
    ex.writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nall of it")
    await ex.writer.drain()
    ex.writer.close()
    raise ConnectionResetError  # ends the server loop for this connection


async def no_content(ex: Exchange) -> None:
    ex.writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")


HANDLERS = {
    "/until-close": until_close,
    "/no-content": no_content,
    "/big": big,
    "/echo": echo,
    "/gzip": gzipped,
    "/stream": stream_three,
    "/forever": stream_forever,
    "/die": die_mid_body,
    "/die-early": die_before_response,
    "/hang": hang,
    "/stall": stall_mid_body,
}


@pytest.fixture(params=TRANSPORT_NAMES)
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    made = make_transport(
        request.param, max_connections=4, connect_timeout=1.0, read_timeout=0.5, keepalive_expiry=4.0
    )
    yield made
    await made.aclose()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer(HANDLERS) as running:
        yield running


async def test_post_round_trip_sends_only_callers_headers(
    transport: Transport, server: ScriptedServer
) -> None:
    body = b'{"model":"m","stream":false}'
    headers = [
        ("content-type", "application/json"),
        ("x-custom", "1"),
        ("connection", "close"),
        ("host", "evil"),
    ]
    response = await transport.send(UpstreamRequest("POST", server.url + "/echo", headers, body))
    assert response.status == 200
    assert await response.aread() == body
    await response.aclose()
    received = server.requests[0]
    names = {name.lower() for name, _ in received.headers}
    assert received.header("x-custom") == "1"
    assert received.header("content-type") == "application/json"
    assert received.header("host") == f"127.0.0.1:{server.port}"
    assert received.header("content-length") == str(len(body))
    # The transport adds nothing the client did not send (no user-agent, no accept-encoding).
    assert "user-agent" not in names
    assert "accept-encoding" not in names
    assert ("x-method", "POST") in response.headers


async def test_bytes_pass_through_undecoded(transport: Transport, server: ScriptedServer) -> None:
    response = await transport.send(UpstreamRequest("GET", server.url + "/gzip"))
    raw = await response.aread()
    await response.aclose()
    assert raw == GZIPPED
    names = {name.lower() for name, _ in response.headers}
    assert ("content-encoding", "gzip") in [(k.lower(), v) for k, v in response.headers]
    assert "connection" not in names  # hop-by-hop headers are not handed to the caller


async def test_streams_chunks_as_they_arrive(transport: Transport, server: ScriptedServer) -> None:
    response = await transport.send(UpstreamRequest("POST", server.url + "/stream", body=b"{}"))
    chunks = [piece async for piece in response.aiter_raw()]
    await response.aclose()
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert len(chunks) >= 2  # delivered incrementally, not buffered into one piece
    names = {name.lower() for name, _ in response.headers}
    assert "transfer-encoding" not in names


async def test_connection_is_reused(transport: Transport, server: ScriptedServer) -> None:
    for _ in range(3):
        response = await transport.send(UpstreamRequest("POST", server.url + "/echo", body=b"x"))
        await response.aread()
        await response.aclose()
    assert server.connections == 1


async def test_aclose_of_unfinished_stream_disconnects_upstream(
    transport: Transport, server: ScriptedServer
) -> None:
    response = await transport.send(UpstreamRequest("POST", server.url + "/forever", body=b"{}"))
    iterator = response.aiter_raw()
    first = await iterator.__anext__()
    assert first.startswith(b"data: first")
    await response.aclose()
    await asyncio.wait_for(server.disconnected.wait(), 2.0)
    # And the transport still works afterwards, on a fresh connection.
    response = await transport.send(UpstreamRequest("POST", server.url + "/echo", body=b"ok"))
    assert await response.aread() == b"ok"
    await response.aclose()


async def test_connect_refused_is_a_connect_error(transport: Transport) -> None:
    with pytest.raises(UpstreamConnectError):
        await transport.send(UpstreamRequest("GET", f"http://127.0.0.1:{closed_port()}/health"))


async def test_invalid_url_is_a_connect_error(transport: Transport) -> None:
    with pytest.raises(UpstreamConnectError):
        await transport.send(UpstreamRequest("GET", "http://127.0.0.1:notaport/health"))


async def test_no_response_within_read_timeout(transport: Transport, server: ScriptedServer) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await transport.send(UpstreamRequest("POST", server.url + "/hang", body=b"{}"))
    assert not isinstance(caught.value, UpstreamConnectError)  # the request was sent: not safe to retry
    assert time.monotonic() - started < 3.0


async def test_per_request_timeout_overrides_read_timeout(
    transport: Transport, server: ScriptedServer
) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await transport.send(UpstreamRequest("GET", server.url + "/hang", timeout=0.1))
    assert time.monotonic() - started < 0.45


async def test_stall_mid_body_times_out(transport: Transport, server: ScriptedServer) -> None:
    response = await transport.send(UpstreamRequest("POST", server.url + "/stall", body=b"{}"))
    with pytest.raises(UpstreamTimeout):
        async for _ in response.aiter_raw():
            pass
    await response.aclose()


async def test_connection_dying_mid_body(transport: Transport, server: ScriptedServer) -> None:
    response = await transport.send(UpstreamRequest("POST", server.url + "/die", body=b"{}"))
    with pytest.raises(UpstreamDisconnected):
        async for _ in response.aiter_raw():
            pass
    await response.aclose()


async def test_connection_dying_before_response_is_not_retry_safe(
    transport: Transport, server: ScriptedServer
) -> None:
    with pytest.raises(UpstreamDisconnected):
        await transport.send(UpstreamRequest("POST", server.url + "/die-early", body=b"{}"))


async def test_waiting_for_a_pooled_connection_counts_as_connecting(server: ScriptedServer) -> None:
    for name in TRANSPORT_NAMES:
        transport = make_transport(
            name, max_connections=1, connect_timeout=0.1, read_timeout=0.2, keepalive_expiry=4.0
        )
        held = await transport.send(UpstreamRequest("POST", server.url + "/forever", body=b"{}"))
        with pytest.raises(UpstreamConnectTimeout) as caught:
            await transport.send(UpstreamRequest("POST", server.url + "/echo", body=b"x"))
        if name != "aiohttp":  # aiohttp cannot tell a pool wait from a slow connect
            assert isinstance(caught.value, UpstreamPoolTimeout)
        await held.aclose()
        await transport.aclose()


async def test_upstream_sockets_have_tcp_nodelay(transport: Transport, server: ScriptedServer) -> None:
    response = await transport.send(UpstreamRequest("POST", server.url + "/forever", body=b"{}"))
    sock = _client_socket(response)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    await response.aclose()


def _client_socket(response: object) -> socket.socket:
    if hasattr(response, "_conn"):  # httptools
        found = response._conn.transport.get_extra_info("socket")
        assert found is not None
        return found  # type: ignore[no-any-return]
    inner = response._response  # type: ignore[attr-defined]
    if hasattr(inner, "connection"):  # aiohttp
        found = inner.connection.transport.get_extra_info("socket")
    else:  # httpx family
        found = inner.extensions["network_stream"].get_extra_info("socket")
    assert found is not None
    return found  # type: ignore[no-any-return]


def test_unknown_transport_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown transport"):
        make_transport("curl", max_connections=1, connect_timeout=1, read_timeout=1)


async def test_large_body_arrives_whole(transport: Transport, server: ScriptedServer) -> None:
    response = await transport.send(UpstreamRequest("GET", server.url + "/big"))
    received = bytearray()
    async for piece in response.aiter_raw():
        received += piece
        await asyncio.sleep(0)  # a slow reader: the transport must hold back, not lose bytes
    await response.aclose()
    assert bytes(received) == BIG


async def test_more_requests_than_connections_all_complete(server: ScriptedServer) -> None:
    for name in TRANSPORT_NAMES:
        transport = make_transport(name, max_connections=3, connect_timeout=1.0, read_timeout=2.0)

        async def one(i: int, transport: Transport = transport) -> bytes:
            response = await transport.send(UpstreamRequest("POST", server.url + "/stream", body=b"%d" % i))
            try:
                return b"".join([piece async for piece in response.aiter_raw()])
            finally:
                await response.aclose()

        results = await asyncio.gather(*(one(i) for i in range(20)))
        assert all(r == b"data: 0\n\ndata: 1\n\ndata: 2\n\n" for r in results), name
        await transport.aclose()
    assert server.connections <= 3 * len(TRANSPORT_NAMES)


async def test_idle_connections_expire_before_the_server_would_close_them(server: ScriptedServer) -> None:
    for name in TRANSPORT_NAMES:
        transport = make_transport(
            name, max_connections=4, connect_timeout=1.0, read_timeout=1.0, keepalive_expiry=0.1
        )
        before = server.connections
        for _ in range(2):
            response = await transport.send(UpstreamRequest("POST", server.url + "/echo", body=b"x"))
            await response.aread()
            await response.aclose()
            await asyncio.sleep(0.6)
        assert server.connections - before == 2, name  # the idle one was not reused after expiry
        await transport.aclose()


async def test_body_delimited_by_connection_close(transport: Transport, server: ScriptedServer) -> None:
    response = await transport.send(UpstreamRequest("GET", server.url + "/until-close"))
    assert await response.aread() == b"all of it"
    await response.aclose()


async def test_no_content_then_reuse(transport: Transport, server: ScriptedServer) -> None:
    for _ in range(2):
        response = await transport.send(UpstreamRequest("POST", server.url + "/no-content", body=b"{}"))
        assert response.status == 204
        assert await response.aread() == b""
        await response.aclose()
    assert server.connections == 1


async def test_header_injection_is_refused_before_sending(
    transport: Transport, server: ScriptedServer
) -> None:
    with pytest.raises(UpstreamConnectError):
        await transport.send(
            UpstreamRequest("POST", server.url + "/echo", [("x-evil", "a\r\nx-injected: 1")], b"{}")
        )
    assert not any(r.header("x-injected") for r in server.requests)
