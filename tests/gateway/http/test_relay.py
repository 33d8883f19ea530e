"""The relay both the regular proxy and the PD decode leg stream through (gateway.http._relay)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from gateway.http._relay import relay_stream, response_headers
from gateway.metrics import TTFT_BUCKETS_S, Histogram, Metrics
from gateway.upstream import UpstreamDisconnected

from ._fakes import FakeResponse

RECEIPT = [("x-cachet-worker", "http://a")]


class _Client:
    def __init__(self) -> None:
        self.started = False
        self.streaming = False
        self.completing = False


class _Clock:
    def __init__(self, *times: float) -> None:
        self._times = list(times)

    def __call__(self) -> float:
        return self._times.pop(0) if len(self._times) > 1 else self._times[0]


async def _relay(
    response: FakeResponse, first: bytes, chunks: AsyncIterator[bytes], **kw: Any
) -> tuple[list[dict[str, Any]], Any, _Client, Metrics]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    client, metrics = _Client(), Metrics()
    outcome = await relay_stream(
        response=response,
        first=first,
        chunks=chunks,
        receipt=RECEIPT,
        send=send,
        client=client,
        began=kw.pop("began", 0.0),
        clock=kw.pop("clock", _Clock(1.0)),
        metrics=metrics,
        worker_url="http://a",
        server="decode server",
        span=None,
        **kw,
    )
    return sent, outcome, client, metrics


async def test_every_chunk_is_passed_through_as_the_same_object_and_usage_comes_from_the_tail() -> None:
    chunks = [
        b'data: {"meta_info":{"prompt_tokens":1}}\n\n',
        b'data: {"meta_info":{"prompt_tokens":9,"cach',
        b'ed_tokens":6,"completion_tokens":2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    response = FakeResponse(200, chunks[1:], content_type="text/event-stream", headers=[("Date", "x")])
    ttft = Histogram(TTFT_BUCKETS_S)
    sent, outcome, client, _ = await _relay(
        response, chunks[0], response.aiter_raw(), began=1.0, clock=_Clock(1.25, 2.0), ttft=ttft, arrived=0.5
    )
    assert sent[0] == {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"text/event-stream"),
            (b"x-cachet-worker", b"http://a"),
        ],
    }
    bodies = [m["body"] for m in sent[1:]]
    assert all(got is want for got, want in zip(bodies[: len(chunks)], chunks, strict=True))
    assert bodies[len(chunks) :] == [b""] and not sent[-1]["more_body"]
    assert outcome.ok
    assert (outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens) == (9, 6, 2)
    # TTFT is stamped once, on entry (the first chunk is in hand): 0.25 s after ``began``, and
    # 0.75 s after ``arrived`` for the histogram; e2e at the end.
    assert outcome.ttft_s == 0.25 and outcome.e2e_s == 1.0
    assert ttft.count == 1 and ttft.total == 0.75
    assert client.started and client.streaming and client.completing


async def test_a_stream_that_ended_before_its_first_byte_sends_only_the_head_and_the_end() -> None:
    response = FakeResponse(200, [], content_type="text/event-stream")
    chunks = response.aiter_raw()
    first = await anext(chunks, b"")
    sent, outcome, _, _ = await _relay(response, first, chunks)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"" and not sent[1]["more_body"]
    assert outcome.ok and outcome.cached_tokens is None


async def test_mid_stream_failure_ends_with_an_error_event_naming_the_server() -> None:
    response = FakeResponse(
        200, [b"data: {}\n\n"], content_type="text/event-stream", fail_with=UpstreamDisconnected("gone")
    )
    sent, outcome, client, metrics = await _relay(response, b"data: {}\n\n", response.aiter_raw())
    last = sent[-1]["body"]
    assert b"The decode server serving this request failed mid-stream" in last
    assert last.endswith(b"data: [DONE]\n\n") and not sent[-1]["more_body"]
    assert not outcome.ok and outcome.ttft_s is not None
    assert metrics.upstream_failures == {("http://a", "mid_stream"): 1}
    assert client.completing


def test_response_headers_drop_what_our_server_writes_and_append_the_receipt() -> None:
    raw = response_headers(
        [("Content-Length", "3"), ("Date", "d"), ("Server", "s"), ("X-Keep", "v")], [("X-Cachet-Reason", "r")]
    )
    assert raw == [(b"x-keep", b"v"), (b"x-cachet-reason", b"r")]
