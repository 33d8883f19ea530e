"""Small raw-ASGI helpers for the hot path (no framework objects per request)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Protocol

from gateway.errors import GatewayError, bad_request, body_too_large, request_body_timeout, sse_error_event
from gateway.telemetry import TRACE_HEADERS

__all__ = [
    "ASGIApp",
    "ClientFlags",
    "ClientGone",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "encode_headers",
    "fail_late",
    "read_body",
    "send_error",
    "send_response",
    "upstream_headers",
    "watch_disconnect",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = b"application/json"


# Client headers not forwarded: the transport sets framing headers itself, the body is always sent
# as JSON whatever the client declared, and the DP rank is routing's to pin.
_DROPPED_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"content-length",
        b"content-type",
        b"expect",
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"x-data-parallel-rank",
    }
)


class _TraceContext(Protocol):
    def upstream_headers(self) -> list[tuple[str, str]]: ...


def upstream_headers(scope: Scope, span: _TraceContext | None) -> list[tuple[str, str]]:
    """The client's headers as sent upstream: framing and rank headers dropped, JSON declared, and
    with tracing on the client's trace context replaced by the gateway span's (never sent twice)."""
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope["headers"]
        if name not in _DROPPED_REQUEST_HEADERS
    ]
    headers.append(("content-type", "application/json"))
    if span is not None:
        headers = [(name, value) for name, value in headers if name.lower() not in TRACE_HEADERS]
        headers.extend(span.upstream_headers())
    return headers


class ClientGone(Exception):
    """The client disconnected before its request body had arrived."""


def encode_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


async def send_response(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], content_type: bytes = JSON
) -> None:
    """A complete response in two ASGI messages, with Content-Length."""
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: GatewayError) -> None:
    await send_response(send, error.status, error.body(), encode_headers(error.headers))


class ClientFlags(Protocol):
    """Where one proxied request stands with its client (shared with its disconnect watcher)."""

    started: bool  # the response head was sent
    streaming: bool  # ... and it is a stream
    completing: bool  # its last body message is being sent: a disconnect now changes nothing
    disconnected: bool
    status: int  # the status the client was answered with (0: none yet)


async def watch_disconnect(receive: Receive, client: ClientFlags, task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` if the client goes away before its answer is complete (the upstream response
    is closed on the way out, so the server aborts the request)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not client.completing:
                client.disconnected = True
                task.cancel()
            return


async def fail_late(send: Send, client: ClientFlags, error: GatewayError) -> None:
    """Tell the client of an error met while proxying: as an error response if nothing was sent yet,
    as an SSE error event (and [DONE]) ending a stream in progress, not at all if it left."""
    if client.disconnected:
        return
    if not client.started:
        client.status = error.status
        await send_error(send, error)
    elif client.streaming and not client.completing:
        client.completing = True
        await send(
            {
                "type": "http.response.body",
                "body": sse_error_event(error.message, error.type, error.code),
                "more_body": False,
            }
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise bad_request("Content-Length is not an integer") from None
    return None


# Media types whose body is read as JSON. Form-urlencoded is what ``curl -d`` declares when no
# header is given; its body is still the JSON the user typed, so refusing it would only get in the way.
_JSON_COMPATIBLE = frozenset({JSON, b"text/plain", b"application/x-www-form-urlencoded"})


def _check_content_type(scope: Scope) -> None:
    """JSON bodies only: a JSON-compatible (or missing) Content-Type is read as JSON; a media type
    that says the body is something else (multipart, XML, binary...) is refused with a 400."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media in _JSON_COMPATIBLE or (media.startswith(b"application/") and media.endswith(b"+json")):
                return
            raise bad_request(
                f"Content-Type must be application/json, got {value.decode('latin-1')!r}",
                code="unsupported_content_type",
            )


async def read_body(scope: Scope, receive: Receive, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole request body, refusing (413) anything over ``limit`` bytes before reading it all,
    and (408) a body that has not fully arrived ``timeout_s`` seconds after reading began: a client
    that stalls mid-body must not hold its connection and task forever."""
    declared = _content_length(scope)
    if declared is not None and declared > limit:
        raise body_too_large(limit)
    _check_content_type(scope)
    try:
        async with asyncio.timeout(timeout_s):
            return await _receive_body(receive, limit)
    except TimeoutError:
        assert timeout_s is not None
        raise request_body_timeout(timeout_s) from None


async def _receive_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise body_too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)
