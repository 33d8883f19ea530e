"""`return_logprob` on /generate: SGLang's meta_info logprob lists, with synthetic but deterministic values.

There is no model, so a token's logprob is a fixed function of (token id, position): the same request always
gets the same numbers, a prefill and its decode agree on the first output token, and the sampled token is
always the most likely entry of its top-k list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.sim.engine import Tokenizer

Entry = list[Any]  # [logprob | None, token_id, text | None]


@dataclass(frozen=True, slots=True)
class LogprobRequest:
    start_len: int  # first prompt position whose logprob is reported
    top_n: int
    with_text: bool


def logprob_of(token_id: int, position: int) -> float:
    mixed = (token_id * 2654435761 + position * 40503 + 12345) % 1000003
    return -round(0.002 + 4.0 * (mixed / 1000003) ** 3, 6)


def _entry(tok: Tokenizer, token_id: int, value: float | None, with_text: bool) -> Entry:
    return [value, token_id, tok.decode([token_id]) if with_text else None]


def _top(tok: Tokenizer, token_id: int, position: int, req: LogprobRequest) -> list[Entry]:
    chosen = logprob_of(token_id, position)
    out = [_entry(tok, token_id, chosen, req.with_text)]
    for k in range(1, req.top_n):
        other = (token_id + 7919 * k) % tok.vocab_size
        out.append(_entry(tok, other, round(chosen - 0.5 * k - 0.25, 6), req.with_text))
    return out


def input_logprobs(tok: Tokenizer, input_ids: list[int], req: LogprobRequest) -> dict[str, list[Any]]:
    start = req.start_len if req.start_len >= 0 else max(len(input_ids) - 1, 0)
    start = min(start, max(len(input_ids) - 1, 0))
    tokens = [
        _entry(tok, t, None if pos == 0 else logprob_of(t, pos), req.with_text)
        for pos, t in enumerate(input_ids[start:], start)
    ]
    out: dict[str, list[Any]] = {"input_token_logprobs": tokens}
    if req.top_n > 0:
        out["input_top_logprobs"] = [
            None if pos == 0 else _top(tok, t, pos, req) for pos, t in enumerate(input_ids[start:], start)
        ]
    return out


def output_logprobs(
    tok: Tokenizer, prompt_len: int, output_ids: list[int], first: int, req: LogprobRequest
) -> dict[str, list[Any]]:
    """Entries for output positions first..len(output_ids)-1."""
    positions = range(prompt_len + first, prompt_len + len(output_ids))
    ids = output_ids[first:]
    out: dict[str, list[Any]] = {
        "output_token_logprobs": [
            _entry(tok, t, logprob_of(t, pos), req.with_text) for pos, t in zip(positions, ids, strict=True)
        ]
    }
    if req.top_n > 0:
        out["output_top_logprobs"] = [_top(tok, t, pos, req) for pos, t in zip(positions, ids, strict=True)]
    return out
