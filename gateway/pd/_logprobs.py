"""Merging the prefill server's input logprobs into the decode server's response.

With PD, the prompt is run on the prefill server, so only it can compute the prompt's logprobs; the
decode server reports its own (partial) ``input_token_logprobs``. As sgl-model-gateway's pd_router
does, the prefill's list is put in front of the decode's, in ``meta_info`` of a native /generate
response, non-streamed and streamed (every event). We also merge ``input_top_logprobs`` and
``input_token_ids_logprobs`` the same way, and batch responses item by item.

This is the one place PD decodes and re-encodes a response: only when the client asked for
logprobs on /generate. OpenAI-endpoint responses carry no input logprobs and pass through as is.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["StreamMerger", "input_logprobs", "merge_body"]

_INPUT_KEYS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")
_DATA = b"data:"
_DONE = b"[DONE]"

InputLogprobs = dict[str, list[Any]]


def _meta_lists(item: Any) -> InputLogprobs:
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        return {}
    return {key: meta[key] for key in _INPUT_KEYS if isinstance(meta.get(key), list)}


def _last_event(body: bytes) -> bytes | None:
    """The payload of the last data event before [DONE] of an SSE body, or None."""
    payload = None
    for line in body.split(b"\n"):
        if line.startswith(_DATA):
            data = line[len(_DATA) :].strip()
            if data and data != _DONE:
                payload = data
    return payload


def input_logprobs(prefill_body: bytes) -> list[InputLogprobs]:
    """The prefill's input logprob lists, one dict per batch item (a JSON body or an SSE stream)."""
    stripped = prefill_body.lstrip()
    payload: bytes | None = stripped
    if stripped.startswith(_DATA):
        payload = _last_event(stripped)
    if not payload:
        return []
    try:
        decoded = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return []
    items = decoded if isinstance(decoded, list) else [decoded]
    return [_meta_lists(item) for item in items]


def _merge_item(item: Any, prefill: InputLogprobs) -> bool:
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        return False
    changed = False
    for key, head in prefill.items():
        tail = meta.get(key)
        if isinstance(tail, list):
            meta[key] = head + tail
            changed = True
    return changed


def merge_body(decode_body: bytes, prefill: list[InputLogprobs]) -> bytes:
    """The decode's JSON body with the prefill's input logprobs in front; unchanged if none apply."""
    if not prefill or not any(prefill):
        return decode_body
    try:
        decoded = msgspec.json.decode(decode_body)
    except msgspec.DecodeError:
        return decode_body
    changed = False
    if isinstance(decoded, list):
        for i, item in enumerate(decoded):
            if i < len(prefill):
                changed |= _merge_item(item, prefill[i])
    else:
        changed = _merge_item(decoded, prefill[0])
    return msgspec.json.encode(decoded) if changed else decode_body


class StreamMerger:
    """Rewrites the events of a /generate SSE stream, merging the prefill's input logprobs.

    Events are re-framed on their ``\\n\\n`` boundaries, so an event split across reads is held
    back until complete; ``flush`` returns whatever is left when the stream ends.
    """

    def __init__(self, prefill: list[InputLogprobs]) -> None:
        self._prefill = prefill
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        complete, self._pending = data[: end + 2], data[end + 2 :]
        return b"".join(self._event(event) for event in complete.split(b"\n\n")[:-1])

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        out = event + b"\n\n"
        if not event.startswith(_DATA):
            return out
        payload = event[len(_DATA) :].strip()
        if not payload.startswith(b"{"):
            return out
        try:
            decoded = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return out
        index = decoded.get("index", 0) if isinstance(decoded, dict) else 0
        if not isinstance(index, int) or not 0 <= index < len(self._prefill):
            return out
        if not _merge_item(decoded, self._prefill[index]):
            return out
        return b"data: " + msgspec.json.encode(decoded) + b"\n\n"
