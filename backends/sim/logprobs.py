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


def _token_dict(tok: Tokenizer, token_id: int, value: float) -> dict[str, Any]:
    text = tok.decode([token_id])
    return {"token": text, "bytes": list(text.encode()), "logprob": value}


def chat_logprobs(tok: Tokenizer, ids: list[int], start_pos: int, top_n: int) -> dict[str, Any]:
    """OpenAI chat `choices[].logprobs` for `ids`, the first of which sits at `start_pos` of the sequence."""
    req = LogprobRequest(start_len=0, top_n=top_n, with_text=False)
    content = []
    for pos, token_id in enumerate(ids, start_pos):
        entry = _token_dict(tok, token_id, logprob_of(token_id, pos))
        entry["top_logprobs"] = (
            [_token_dict(tok, t[1], t[0]) for t in _top(tok, token_id, pos, req)] if top_n else []
        )
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    tok: Tokenizer, ids: list[int], start_pos: int, top_n: int, text_offset: int
) -> dict[str, Any]:
    """OpenAI completions `choices[].logprobs` (text_offset, token_logprobs, tokens, top_logprobs)."""
    req = LogprobRequest(start_len=0, top_n=max(top_n, 1), with_text=False)
    offsets: list[int] = []
    values: list[float] = []
    tokens: list[str] = []
    tops: list[dict[str, float]] = []
    for pos, token_id in enumerate(ids, start_pos):
        text = tok.decode([token_id])
        offsets.append(text_offset)
        text_offset += len(text)
        values.append(logprob_of(token_id, pos))
        tokens.append(text)
        if top_n:
            tops.append({tok.decode([t[1]]): t[0] for t in _top(tok, token_id, pos, req)[:top_n]})
    return {"text_offset": offsets, "token_logprobs": values, "tokens": tokens, "top_logprobs": tops}
