"""Relaying one upstream response to the client: the piece the regular proxy and the PD decode leg share.

    response head ─▶ filtered headers + receipt ─▶ http.response.start
    first chunk, then every chunk ─▶ http.response.body (bytes unchanged; last few kept)
    end of stream ─▶ Outcome from the last event (usage / cached_tokens), TTFT stamped at the first byte
    upstream dies mid-stream ─▶ SSE error event + [DONE], Outcome(ok=False)

The per-chunk loop is the hot path: one deque append and one ``send`` per chunk, nothing decoded.
Whoever needs to rewrite chunks (PD's logprob merge) hands in an iterator that already does it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

from gateway.errors import mid_stream_failure_event
from gateway.http._asgi import Send
from gateway.http._usage import outcome_from_usage, usage_from_stream_tail
from gateway.metrics import Histogram, Metrics
from gateway.routing import Outcome
from gateway.upstream import UpstreamError, UpstreamResponse, UpstreamTimeout

__all__ = [
    "RelayClient",
    "error_detail",
    "is_event_stream",
    "relay_stream",
    "response_headers",
    "send_whole",
]

logger = logging.getLogger("cachet.gateway.relay")

# Upstream response headers our server writes itself.
_DROPPED_RESPONSE_HEADERS = frozenset({"content-length", "date", "server"})
_EVENT_STREAM = "text/event-stream"
# Raw chunks kept to find the last event of a stream (one cumulative /generate event can span
# several reads).
_TAIL_CHUNKS = 8


class RelayClient(Protocol):
    """The per-request flags the disconnect watcher and the late-failure handler read."""

    started: bool
    streaming: bool
    completing: bool


class _SpanAttributes(Protocol):
    def set(self, **attributes: str | int | float | bool | None) -> None: ...


def response_headers(
    headers: Iterable[tuple[str, str]], receipt: Iterable[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as the client gets them (lower-cased, minus what our server
    writes itself), followed by the receipt headers."""
    raw = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in headers
        if name.lower() not in _DROPPED_RESPONSE_HEADERS
    ]
    raw.extend((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in receipt)
    return raw


def is_event_stream(headers: Iterable[tuple[str, str]]) -> bool:
    for name, value in headers:
        if name.lower() == "content-type":
            return value.startswith(_EVENT_STREAM)
    return False


async def error_detail(response: UpstreamResponse, limit: int = 300) -> str:
    """A short excerpt of an upstream error body, for the gateway's own error message."""
    try:
        data = await response.aread()
    except UpstreamError as exc:
        return f"(body unreadable: {type(exc).__name__})"
    text = data[:limit].decode("utf-8", "replace").strip()
    return text or "(empty body)"


async def send_whole(
    *,
    send: Send,
    client: RelayClient,
    status: int,
    headers: Iterable[tuple[str, str]],
    data: bytes,
    receipt: Iterable[tuple[str, str]],
) -> None:
    """A complete (non-streamed) upstream answer, with its Content-Length."""
    raw = response_headers(headers, receipt)
    raw.append((b"content-length", str(len(data)).encode()))
    client.started = True
    client.completing = True
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def relay_stream(
    *,
    response: UpstreamResponse,
    first: bytes,
    chunks: AsyncIterator[bytes],
    receipt: Iterable[tuple[str, str]],
    send: Send,
    client: RelayClient,
    began: float,
    clock: Callable[[], float],
    metrics: Metrics,
    worker_url: str,
    server: str,
    span: _SpanAttributes | None,
    ttft: Histogram | None = None,
    arrived: float = 0.0,
) -> Outcome:
    """Stream ``first`` then ``chunks`` to the client under ``response``'s status and headers.

    Called once the first chunk is in hand (the caller waited for it, so a server that died before
    it could be replaced). TTFT is stamped now, relative to ``began`` for the Outcome and, when
    ``ttft`` is given, to ``arrived`` for that histogram. A chunk of ``first`` that is empty is not
    sent. An upstream failure from here on ends the stream with an SSE error event naming
    ``server`` (``worker_url`` is counted as a ``mid_stream`` failure). The response is not closed:
    that is the caller's.
    """
    now = clock()
    if ttft is not None:
        ttft.observe(now - arrived)
    ttft_s = now - began
    client.started = True
    client.streaming = True
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": response_headers(response.headers, receipt),
        }
    )
    tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
    try:
        if first:
            tail.append(first)
            await send({"type": "http.response.body", "body": first, "more_body": True})
        async for chunk in chunks:
            tail.append(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except UpstreamError as exc:
        logger.warning("%s %s failed mid-stream: %s", server, worker_url, exc)
        metrics.upstream_failure(worker_url, "mid_stream")
        client.completing = True
        await send(
            {
                "type": "http.response.body",
                "body": mid_stream_failure_event(server, exc, timed_out=isinstance(exc, UpstreamTimeout)),
                "more_body": False,
            }
        )
        return Outcome(ok=False, ttft_s=ttft_s, e2e_s=clock() - began)
    client.completing = True
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return outcome_from_usage(usage_from_stream_tail(tail), ttft_s, clock() - began, span)
