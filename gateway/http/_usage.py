"""Token counts read from the end of a response: the final body, or the last event of a stream.

Only the last event is decoded (never each chunk): OpenAI streams carry ``usage`` on their last
event when they carry it at all, and SGLang's native stream repeats ``meta_info`` on every event,
so the last one before ``[DONE]`` has the totals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import msgspec

from gateway.routing import Outcome

__all__ = ["Usage", "usage_from_body", "usage_from_stream_tail"]


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _OpenAIUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _MetaInfo(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


class _Final(msgspec.Struct):
    usage: _OpenAIUsage | None = None
    meta_info: _MetaInfo | None = None
    error: Any = None


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    # The final event / body was an error report.
    error: bool = False


_ONE = msgspec.json.Decoder(_Final)
_MANY = msgspec.json.Decoder(list[_Final])
_EVENT_START = b"data:"
_DONE = b"data: [DONE]"


def _usage_of(final: _Final) -> Usage:
    if final.meta_info is not None:
        meta = final.meta_info
        return Usage(meta.prompt_tokens, meta.cached_tokens, meta.completion_tokens, final.error is not None)
    if final.usage is not None:
        usage = final.usage
        details = usage.prompt_tokens_details
        return Usage(
            usage.prompt_tokens,
            details.cached_tokens if details is not None else None,
            usage.completion_tokens,
            final.error is not None,
        )
    return Usage(error=final.error is not None)


def _add(a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return a if b is None else b
    return a + b


def usage_from_body(body: bytes) -> Usage:
    """Counts in a non-streamed JSON body (an object, or a /generate batch array)."""
    stripped = body.lstrip()
    try:
        if stripped[:1] == b"[":
            total = Usage()
            for item in _MANY.decode(body):
                one = _usage_of(item)
                total = Usage(
                    _add(total.prompt_tokens, one.prompt_tokens),
                    _add(total.cached_tokens, one.cached_tokens),
                    _add(total.completion_tokens, one.completion_tokens),
                    total.error or one.error,
                )
            return total
        return _usage_of(_ONE.decode(body))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Usage()


def usage_from_stream_tail(chunks: Iterable[bytes]) -> Usage:
    """Counts in the last data event of an SSE stream, given its last few raw chunks."""
    tail = b"".join(chunks)
    end = tail.rfind(_DONE)
    if end < 0:
        end = len(tail)
    # An event starts a line; JSON strings cannot hold a raw newline, so "\ndata:" is never inside one.
    start = tail.rfind(b"\n" + _EVENT_START, 0, end) + 1
    if start == 0 and not tail.startswith(_EVENT_START):
        return Usage()
    payload = tail[start + len(_EVENT_START) : end].strip()
    if not payload.startswith(b"{"):
        return Usage()
    try:
        return _usage_of(_ONE.decode(payload))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Usage()


class _SpanAttributes(Protocol):
    def set(self, **attributes: str | int | float | bool | None) -> None: ...


def outcome_from_usage(usage: Usage, ttft: float | None, e2e: float, span: _SpanAttributes | None) -> Outcome:
    """What routing learns from a finished response (and the span records of it)."""
    if span is not None:
        span.set(
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            ttft_s=ttft,
        )
    return Outcome(
        ok=not usage.error,
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=usage.cached_tokens,
        completion_tokens=usage.completion_tokens,
        ttft_s=ttft,
        e2e_s=e2e,
    )
