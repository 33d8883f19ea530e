"""One benchmark request as plain data, shared by the HTTP driver, locust and the replayer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

__all__ = ["BenchRequest", "dump_jsonl", "load_jsonl", "prompt_text"]


class BenchRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request and when to send it.

    Exactly one of ``messages`` (chat) and ``prompt`` (raw completion text) is set. ``arrival_s`` is
    the earliest send time from the start of the run. ``after`` names the request this one waits
    for (the previous round of a chat): it is sent ``think_s`` after that one finishes, and never
    before ``arrival_s``.
    """

    rid: str
    arrival_s: float
    max_tokens: int
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    after: str | None = None
    think_s: float = 0.0
    # Who this request belongs to (shared-prefix group, chat user, Mooncake session root): for analysis.
    group: str = ""
    # Prompt length the generator aimed for, in simulator tokens (template overhead not included).
    target_prompt_tokens: int = 0
    # Mooncake only: the 512-token block ids the prompt was built from (lets a replayer tokenise
    # block by block instead of re-tokenising shared text).
    block_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError(f"request {self.rid}: set exactly one of messages and prompt")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.rid}: max_tokens must be >= 1")


def prompt_text(request: BenchRequest) -> str:
    """The request's text as a router that does not apply a chat template sees it: message contents
    joined by a space (what sglang-router extracts for its cache-aware tree), or the raw prompt."""
    if request.prompt is not None:
        return request.prompt
    assert request.messages is not None
    return " ".join(m["content"] for m in request.messages)


_encoder = msgspec.json.Encoder()


def dump_jsonl(requests: Iterable[BenchRequest], path: Path) -> int:
    count = 0
    with path.open("wb") as out:
        for request in requests:
            out.write(_encoder.encode(request))
            out.write(b"\n")
            count += 1
    return count


def load_jsonl(path: Path) -> Iterator[BenchRequest]:
    decoder = msgspec.json.Decoder(BenchRequest)
    with path.open("rb") as source:
        for line in source:
            if line.strip():
                yield decoder.decode(line)
