"""A lean HTTP/1.1 client transport: asyncio protocols, httptools' C parser, a keep-alive pool.

A proxy needs little of a general HTTP client (no cookies, redirects, auth, proxies, decoding,
TLS to local servers), and that generality costs CPU on every request. This transport does only
what the seam promises: one write per request (head and body together), the response head parsed
in C, body chunks handed over as they arrive with at most one syscall's worth of buffering, idle
connections reused until ``keepalive_expiry``, and a connection dropped (not pooled) whenever a
response was not read to its end.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

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

# Stop reading from the socket while this much body is waiting for the caller.
_HIGH_WATER = 256 * 1024
_URL_CACHE_SIZE = 4096
_Origin = tuple[str, int]


class _Target:
    """A URL split once into what a request line and a connection need."""

    __slots__ = ("head_prefix", "origin")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise UpstreamConnectError(f"unsupported upstream URL {url!r} (only http:// is spoken)")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise UpstreamConnectError(f"invalid upstream URL {url!r}: {exc}") from exc
        host = parts.hostname
        if not host:
            raise UpstreamConnectError(f"invalid upstream URL {url!r}: no host")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        self.origin: _Origin = (host, port)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        # "{METHOD} " is prepended per request.
        try:
            self.head_prefix = f" {target} HTTP/1.1\r\nhost: {netloc}\r\n".encode("ascii")
        except UnicodeEncodeError as exc:
            raise UpstreamConnectError(f"upstream URL {url!r} is not ASCII; percent-encode it") from exc


class _Connection(asyncio.Protocol):
    """One upstream connection and the response currently being read from it."""

    def __init__(self, pool: HttptoolsTransport, origin: _Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.idle_since = 0.0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.message_done = False
        self.until_close = False
        self.no_body = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamDisconnected("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamDisconnected(f"invalid HTTP from upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.headers_done and self.until_close and not self.message_done:
            self.message_done = True  # a body delimited by the connection's end has ended
        elif not self.message_done and self.error is None:
            stage = "mid-response" if self.headers_done else "before the response"
            self.error = UpstreamDisconnected(f"connection lost {stage}" + (f": {exc}" if exc else ""))
        self._wake()
        self._pool.forget(self)

    def pause_writing(self) -> None:
        pass  # requests are small; a full send buffer only delays them

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        framed = False
        for name, value in self.raw_headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                framed = True
                break
        status = self.parser.get_status_code()
        self.until_close = not framed and status >= 200 and status not in (204, 304)
        if self.no_body:
            # A HEAD response has no body whatever its headers say; the parser cannot know that,
            # so the message ends here and the connection is not reused.
            self.message_done = True
            self.until_close = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Only meaningful inside the callback: the parser forgets it once the message is over.
        self.keep_alive = self.parser.should_keep_alive()
        self.message_done = True
        self._wake()

    # --- used by the transport and the response -----------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Wait for the next parser event; UpstreamTimeout after ``timeout_s`` of silence."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.raw_headers = []
        self.headers_done = False
        self.message_done = False
        self.until_close = False
        self.no_body = False
        self.keep_alive = False
        self.chunks.clear()
        self.buffered = 0

    def take_chunks(self) -> bytes:
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return (
            self.message_done
            and self.error is None
            and not self.lost
            and not self.until_close
            and self.transport is not None
            and not self.transport.is_closing()
            and self.keep_alive
        )

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _HttptoolsResponse:
    __slots__ = ("_closed", "_conn", "_headers", "_raw_headers", "_read_timeout", "_transport", "status")

    def __init__(self, transport: HttptoolsTransport, conn: _Connection, read_timeout: float) -> None:
        self._transport = transport
        self._conn = conn
        self._read_timeout = read_timeout
        self.status: int = conn.parser.get_status_code()
        # Kept here: the connection starts a fresh list when it is reused for another request.
        self._raw_headers = conn.raw_headers
        self._headers: list[tuple[str, str]] | None = None
        self._closed = False

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self._headers is None:
            self._headers = response_headers(self._raw_headers)
        return self._headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take_chunks()
                continue
            if conn.message_done:
                return
            if conn.error is not None:
                raise conn.error
            try:
                await conn.wait(self._read_timeout)
            except TimeoutError:
                conn.close()
                raise UpstreamTimeout(f"no body bytes from upstream for {self._read_timeout}s") from None

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport.release(self._conn)


class HttptoolsTransport:
    """The lean transport. Safe to create outside a running loop; connects lazily."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_expiry: float,
    ) -> None:
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[_Origin, collections.deque[_Connection]] = {}
        self._open = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._targets: dict[str, _Target] = {}
        self._closed = False

    # --- pool ----------------------------------------------------------------------------------

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _URL_CACHE_SIZE:
                self._targets.clear()
            target = self._targets[url] = _Target(url)
        return target

    def _take_idle(self, origin: _Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely to be expiring
            if conn.lost or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since >= self._keepalive_expiry:
                self._drop(conn)
                continue
            return conn
        return None

    def _drop(self, conn: _Connection) -> None:
        conn.close()

    def _evict_one_idle(self) -> bool:
        for idle in self._idle.values():
            if idle:
                self._drop(idle.popleft())
                return True
        return False

    async def _acquire(self, origin: _Origin, read_timeout: float) -> _Connection:
        """A connection to ``origin``: a pooled idle one if one is fresh enough, else a new one."""
        loop = asyncio.get_running_loop()
        conn = self._take_idle(origin, loop.time())
        if conn is not None:
            return conn
        deadline = loop.time() + self._connect_timeout + read_timeout
        while self._open >= self._max_connections:
            # An idle connection to another server gives up its slot (freed in its connection_lost).
            self._evict_one_idle()
            waiter = loop.create_future()
            self._slot_waiters.append(waiter)
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise UpstreamPoolTimeout(
                    f"no free upstream connection (all {self._max_connections} busy)"
                ) from None
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)
            conn = self._take_idle(origin, loop.time())
            if conn is not None:
                return conn
        self._open += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(lambda: _Connection(self, origin), *origin)
        except TimeoutError:
            self._slot_freed()
            raise UpstreamConnectTimeout(f"connecting to {origin[0]}:{origin[1]} timed out") from None
        except OSError as exc:
            self._slot_freed()
            raise UpstreamConnectError(f"cannot connect to {origin[0]}:{origin[1]}: {exc}") from exc
        except BaseException:
            self._slot_freed()
            raise
        return protocol

    def _slot_freed(self) -> None:
        self._open -= 1
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def forget(self, conn: _Connection) -> None:
        """Called once per connection, when its socket is gone."""
        idle = self._idle.get(conn.origin)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self._slot_freed()

    def release(self, conn: _Connection) -> None:
        if conn.reusable() and not self._closed:
            conn.reset()
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(conn.origin, collections.deque()).append(conn)
            # A caller waiting for a slot can now reuse this connection.
            for waiter in self._slot_waiters:
                if not waiter.done():
                    waiter.set_result(None)
                    break
        else:
            conn.close()

    # --- the seam ------------------------------------------------------------------------------

    @staticmethod
    def _request_bytes(request: UpstreamRequest, target: _Target) -> bytes:
        head = [request.method.encode("latin-1"), target.head_prefix]
        try:
            for name, value in request_headers(request.headers):
                line = f"{name}: {value}\r\n"
                if line.count("\n") != 1 or "\r" in line[:-2]:
                    raise ValueError(f"header {name!r} contains a line break")
                head.append(line.encode("latin-1"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise UpstreamConnectError(f"invalid upstream request header: {exc}") from exc
        body = request.body
        if body or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        head.append(body)
        return b"".join(head)

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        if self._closed:
            raise UpstreamConnectError("transport is closed")
        target = self._target(request.url)
        data = self._request_bytes(request, target)
        read_timeout = self._read_timeout if request.timeout is None else request.timeout
        # A request is never re-sent here: a pooled connection that dies before any response byte may
        # have been closed by the server's idle timer before it read the request, or by a crash after
        # it did; the two look alike, so the caller (who knows whether a retry is safe) decides.
        # Expiring idle connections before SGLang's 5 s keeps the first case rare.
        conn = await self._acquire(target.origin, read_timeout)
        assert conn.transport is not None
        conn.no_body = request.method == "HEAD"
        conn.transport.write(data)
        try:
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(read_timeout)
        except TimeoutError:
            conn.close()
            raise UpstreamTimeout(f"no response from upstream within {read_timeout}s") from None
        except BaseException:
            conn.close()
            raise
        return _HttptoolsResponse(self, conn, read_timeout)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.popleft().close()
