"""The Mooncake trace (FAST'25) as requests.

Each 512-token block id becomes a fixed, distinct 512-token text (same id → same text, in every
process), a request's prompt is its blocks joined with the last one cut to ``input_length``, and
arrival times may be compressed (``time_scale`` 0.1 replays a 17-minute trace in 1.7 minutes).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

from loadtests.workloads.request import BenchRequest
from loadtests.workloads.text import filler_words

__all__ = ["BLOCK_TOKENS", "DEFAULT_TRACE", "block_text", "mooncake_prompt", "mooncake_trace"]

BLOCK_TOKENS = 512
DEFAULT_TRACE = Path("/work/shared/traces/mooncake_synthetic_trace.jsonl")


@functools.lru_cache(maxsize=16384)
def _block_words(block_id: int) -> tuple[str, ...]:
    return tuple(filler_words(f"mooncake-block:{block_id}", BLOCK_TOKENS))


def block_text(block_id: int, tokens: int = BLOCK_TOKENS) -> str:
    """The text of one block id: exactly ``tokens`` simulator tokens (at most 512), a prefix of the
    full block's text when shorter."""
    return "".join(_block_words(block_id)[: min(tokens, BLOCK_TOKENS)])


def mooncake_prompt(block_ids: tuple[int, ...] | list[int], input_length: int) -> str:
    """Blocks joined; the last block holds what is left of ``input_length`` after the full ones."""
    if not block_ids:
        raise ValueError("a Mooncake request needs at least one block id")
    last_tokens = input_length - BLOCK_TOKENS * (len(block_ids) - 1)
    if not 0 < last_tokens <= BLOCK_TOKENS:
        raise ValueError(
            f"input_length {input_length} does not fit {len(block_ids)} blocks of {BLOCK_TOKENS}"
        )
    parts = [block_text(b) for b in block_ids[:-1]]
    parts.append(block_text(block_ids[-1], last_tokens))
    return "".join(parts)


def mooncake_trace(
    path: Path = DEFAULT_TRACE,
    *,
    limit: int | None = None,
    time_scale: float = 1.0,
    start_s: float = 0.0,
    max_input_tokens: int | None = None,
) -> Iterator[BenchRequest]:
    """Requests in trace order, lazily (the whole trace is ~245 MB of prompt text).

    ``start_s`` skips requests before that trace time and shifts the rest to start at 0;
    ``max_input_tokens`` drops longer requests (e.g. beyond a context length).
    """
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    emitted = 0
    with path.open() as source:
        for line_no, line in enumerate(source):
            if limit is not None and emitted >= limit:
                return
            if not line.strip():
                continue
            row = json.loads(line)
            at_s = row["timestamp"] / 1000.0
            if at_s < start_s:
                continue
            input_length = int(row["input_length"])
            if max_input_tokens is not None and input_length > max_input_tokens:
                continue
            blocks = tuple(int(b) for b in row["hash_ids"])
            yield BenchRequest(
                rid=f"mc-{line_no}",
                arrival_s=(at_s - start_s) * time_scale,
                max_tokens=max(int(row["output_length"]), 1),
                prompt=mooncake_prompt(blocks, input_length),
                group=f"b{blocks[0]}",
                target_prompt_tokens=input_length,
                block_ids=blocks,
            )
            emitted += 1
