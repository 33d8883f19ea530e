"""Canonical prompts and their chained block hashes, without a tokenizer.

The gateway cannot tokenize (it has no tokenizer, and servers may differ), so a prompt is cut into
fixed-size blocks of its canonical UTF-8 bytes — or of token ids when the client sends ids — and
block i is named by a hash of blocks 0..i. Two prompts sharing their first k blocks share their
first k hashes, which is exactly what a radix cache can reuse. The hash is keyed BLAKE2b, stable
across processes and machines, so gateway replicas agree on names through Redis.

Chat messages are rendered from role and content only, deterministically; that is not the model's
chat template (the server applies that), but two requests whose messages agree on a prefix get the
same leading blocks, and that is all routing needs.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_BLOCK_IDS",
    "PromptBlocks",
    "canonical_chat",
    "hash_bytes_blocks",
    "hash_id_blocks",
]

# 256 bytes ≈ 64 tokens of English: fine enough to see a shared system prompt end, coarse enough
# that a 32k-token prompt is ~500 hashes.
DEFAULT_BLOCK_BYTES = 256
DEFAULT_BLOCK_IDS = 64

_TEXT_PERSON = b"cachet-text"
_IDS_PERSON = b"cachet-ids"
_RECORD_SEP = "\x1e"
_UNIT_SEP = "\x1f"

_ENCODER = msgspec.json.Encoder(order="sorted")


class PromptBlocks(msgspec.Struct, frozen=True):
    """A canonical prompt's block hashes. ``unit`` says what a block is made of."""

    hashes: tuple[int, ...]
    unit: str  # "bytes" | "ids"
    block_size: int
    # Length of the whole canonical prompt in units (bytes or ids), partial last block included.
    length: int


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                parts.append(_ENCODER.encode(part).decode())
        return _UNIT_SEP.join(parts)
    return _ENCODER.encode(content).decode()


def canonical_chat(messages: Sequence[Any]) -> str:
    """Messages as one deterministic string: role, content, then any other fields in sorted JSON."""
    out: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping):
            out.append(_RECORD_SEP + _ENCODER.encode(message).decode())
            continue
        role = message.get("role")
        out.append(_RECORD_SEP)
        out.append(role if isinstance(role, str) else _ENCODER.encode(role).decode())
        out.append(_UNIT_SEP)
        out.append(_content_text(message.get("content")))
        extra = {k: v for k, v in message.items() if k not in ("role", "content")}
        if extra:
            out.append(_UNIT_SEP)
            out.append(_ENCODER.encode(extra).decode())
    return "".join(out)


def hash_bytes_blocks(data: bytes, block_bytes: int = DEFAULT_BLOCK_BYTES) -> PromptBlocks:
    """Chained hashes of the full ``block_bytes`` blocks of ``data`` (a partial tail is not hashed:
    it is not yet a reusable unit)."""
    full = len(data) // block_bytes
    hasher = hashlib.blake2b(digest_size=8, person=_TEXT_PERSON)
    view = memoryview(data)
    hashes: list[int] = []
    for i in range(full):
        hasher.update(view[i * block_bytes : (i + 1) * block_bytes])
        hashes.append(int.from_bytes(hasher.copy().digest(), "little"))
    return PromptBlocks(tuple(hashes), "bytes", block_bytes, len(data))


def hash_id_blocks(ids: Sequence[int], block_ids: int = DEFAULT_BLOCK_IDS) -> PromptBlocks:
    """Chained hashes of full blocks of token ids (as little-endian int64)."""
    full = len(ids) // block_ids
    packed = array("q", ids[: full * block_ids]).tobytes()
    step = block_ids * 8
    hasher = hashlib.blake2b(digest_size=8, person=_IDS_PERSON)
    view = memoryview(packed)
    hashes: list[int] = []
    for i in range(full):
        hasher.update(view[i * step : (i + 1) * step])
        hashes.append(int.from_bytes(hasher.copy().digest(), "little"))
    return PromptBlocks(tuple(hashes), "ids", block_ids, len(ids))
