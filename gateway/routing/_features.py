"""From a request's routing view to what a policy knows about it, without a tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from policies.prefix import PromptBlocks, canonical_chat, hash_bytes_blocks, hash_id_blocks

__all__ = ["RoutingRequest", "prompt_blocks"]


class RoutingRequest(msgspec.Struct):
    """The part of a client request routing looks at (decoded by the HTTP layer)."""

    model: str
    endpoint: str  # "chat" | "completion" | "generate"
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[Any] | None = None
    text: str | list[Any] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    max_new_tokens: int | None = None
    stream: bool = False
    exclude: frozenset[str] = frozenset()  # worker URLs to avoid (a retry after a failure there)


def _first(batch: list[Any]) -> Any:
    # A batch is served by one server; its first prompt stands for the batch's prefix.
    return batch[0] if batch else ""


def _hash_ids(ids: Sequence[Any], block_ids: int) -> PromptBlocks | None:
    if all(isinstance(i, int) and not isinstance(i, bool) and -(2**63) <= i < 2**63 for i in ids):
        return hash_id_blocks(ids, block_ids)
    return None


def prompt_blocks(req: RoutingRequest, *, block_bytes: int, block_ids: int) -> tuple[PromptBlocks, int]:
    """The request's canonical prompt as block hashes, and how many prompts a batch holds."""
    source: Any
    if req.messages is not None:
        return hash_bytes_blocks(canonical_chat(req.messages).encode(), block_bytes), 1
    if req.input_ids is not None:
        source = req.input_ids
    elif req.text is not None:
        source = req.text
    else:
        source = req.prompt
    batch = 1
    if isinstance(source, list) and source and isinstance(source[0], (list, str)):
        batch = len(source)
        source = _first(source)
    if isinstance(source, str):
        return hash_bytes_blocks(source.encode(), block_bytes), batch
    if isinstance(source, list):
        blocks = _hash_ids(source, block_ids)
        if blocks is not None:
            return blocks, batch
    # Anything else (an empty prompt, odd JSON) still routes; it just has no reusable prefix.
    return hash_bytes_blocks(msgspec.json.encode(source), block_bytes), batch
