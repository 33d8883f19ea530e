"""A thin raw-ASGI request/response layer reproducing the bytes FastAPI/Starlette put on the wire.

uvicorn itself adds `date` and `server: uvicorn`; what Starlette adds (content-type with charset for text,
content-length, CORS echo) is reproduced here so that a router sees an SGLang server's exact headers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import msgspec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream; charset=utf-8"
TEXT_PLAIN = b"text/plain; charset=utf-8"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"

_encoder = msgspec.json.Encoder()
encode_json = _encoder.encode
# A 163k-token prompt is ~1 MB of text; bigger bodies would only stall the event loop while tokenising.
MAX_BODY_BYTES = 16 * 1024 * 1024


class BodyTooLarge(Exception):
    pass


class Disconnected(Exception):
    """The client went away while we were reading its body."""


class HttpRequest:
    """One HTTP exchange; handlers answer with exactly one of respond() or the stream methods."""

    __slots__ = (
        "_cors",
        "_started",
        "_stream_started",
        "headers",
        "method",
        "path",
        "query",
        "receive",
        "scope",
        "send",
        "status",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        raw_query: bytes = scope.get("query_string", b"")
        self.query: dict[str, str] = dict(parse_qsl(raw_query.decode("latin-1"))) if raw_query else {}
        self.headers: dict[str, str] = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        origin = self.headers.get("origin")
        # SGLang's CORSMiddleware(allow_origins=["*"], allow_credentials=True) echoes the origin back.
        self._cors: list[tuple[bytes, bytes]] = (
            [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin"),
            ]
            if origin
            else []
        )
        self._stream_started = False
        self._started = False
        self.status = 0

    async def body(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes | None = JSON,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [(b"content-length", str(len(body)).encode())]
        if content_type is not None:
            headers.append((b"content-type", content_type))
        if extra_headers:
            headers.extend(extra_headers)
        headers.extend(self._cors)
        await self.start(status, headers)
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._started = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def respond_json(self, status: int, payload: object) -> None:
        await self.respond(status, encode_json(payload))

    async def start_stream(self, content_type: bytes = EVENT_STREAM) -> None:
        self._stream_started = True
        await self.start(200, [(b"content-type", content_type), *self._cors])

    async def stream(self, chunk: bytes) -> None:
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end_stream(self, last: bytes = b"") -> None:
        await self.send({"type": "http.response.body", "body": last, "more_body": False})

    @property
    def stream_started(self) -> bool:
        return self._stream_started

    @property
    def response_started(self) -> bool:
        return self._started

    async def wait_disconnect(self) -> None:
        """Returns once the client has gone (or the response is complete: uvicorn reports both alike)."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
