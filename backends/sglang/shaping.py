"""Shaping a request for one server: pinning the DP rank the router chose.

Bodies are edited at the byte level: members are appended just before the closing brace of the
top-level JSON object, so the body is never decoded or re-serialised. Appending (rather than
inserting after the opening brace) also makes the gateway's value win if the client sent the same
key, because SGLang's JSON parsers keep the last duplicate.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from backends.sglang.versions import RankKey, dialect

_WHITESPACE = b" \t\r\n"
_OPEN_BRACE = ord("{")
_CLOSE_BRACE = ord("}")
DP_RANK_HEADER = "X-Data-Parallel-Rank"
GENERATE_ENDPOINTS = frozenset({"generate", "/generate"})


class NotAJsonObject(ValueError):
    """The body is not a JSON object (e.g. a top-level array), so no member can be added to it."""


class ServerLike(Protocol):
    """What shaping needs to know about a server (gateway.registry.Worker satisfies it)."""

    @property
    def url(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def dp_size(self) -> int: ...


def encode_members(fields: dict[str, object]) -> bytes:
    """``{"a": 1, "b": "x"}`` -> ``b'"a":1,"b":"x"'`` (the inside of a JSON object)."""
    encoded = msgspec.json.encode(fields)
    return encoded[1:-1]


def append_json_members(body: bytes, members: bytes) -> bytes:
    """Append already-encoded members (``b'"k":v,...'``) to a JSON object body.

    The body must be valid JSON (the gateway has decoded its routing view already); only its
    outer bytes are inspected. Raises NotAJsonObject for anything but an object.
    """
    if not members:
        return body
    end = len(body)
    while end and body[end - 1] in _WHITESPACE:
        end -= 1
    start = 0
    while start < end and body[start] in _WHITESPACE:
        start += 1
    if end - start < 2 or body[start] != _OPEN_BRACE or body[end - 1] != _CLOSE_BRACE:
        raise NotAJsonObject("request body is not a JSON object")
    inner = start + 1
    while inner < end - 1 and body[inner] in _WHITESPACE:
        inner += 1
    separator = b"" if inner == end - 1 else b","
    return b"".join((body[: end - 1], separator, members, body[end - 1 :]))


def rank_members(server: ServerLike, dp_rank: int | None) -> bytes:
    """The ``/generate`` body members that pin ``dp_rank`` on ``server`` (empty if none needed)."""
    if dp_rank is None or server.dp_size <= 1:
        return b""
    if dp_rank < 0 or dp_rank >= server.dp_size:
        raise ValueError(f"dp_rank {dp_rank} out of range [0, {server.dp_size}) for {server.url}")
    key = dialect(server.version).rank_key
    rank = str(dp_rank).encode()
    if key is RankKey.ROUTED_DP_RANK:
        return b'"routed_dp_rank":' + rank
    if key is RankKey.DATA_PARALLEL_RANK:
        return b'"data_parallel_rank":' + rank
    return b'"data_parallel_rank":' + rank + b',"routed_dp_rank":' + rank


def shape_generate_body(server: ServerLike, body: bytes, dp_rank: int | None) -> bytes:
    """Pin ``dp_rank`` in a native ``/generate`` body.

    A batch ``/generate`` (list-valued text/input_ids) should be given ``dp_rank=None``: the server
    spreads batch items over its ranks itself.
    """
    return append_json_members(body, rank_members(server, dp_rank))


def dp_rank_headers(server: ServerLike, dp_rank: int | None) -> list[tuple[str, str]]:
    """Headers pinning ``dp_rank`` on an OpenAI-compatible (``/v1/*``) endpoint."""
    if dp_rank is None or server.dp_size <= 1:
        return []
    if dp_rank < 0 or dp_rank >= server.dp_size:
        raise ValueError(f"dp_rank {dp_rank} out of range [0, {server.dp_size}) for {server.url}")
    return [(DP_RANK_HEADER, str(dp_rank))]


def shape_request(
    server: ServerLike,
    endpoint: str,
    body: bytes,
    headers: list[tuple[str, str]],
    dp_rank: int | None,
) -> tuple[bytes, list[tuple[str, str]]]:
    """Pin ``dp_rank`` the way ``endpoint`` expects: in the body for ``/generate``, a header on ``/v1/*``.

    ``endpoint`` is "generate" (or "/generate") for the native API; anything else ("chat",
    "completion", "/v1/...") is treated as OpenAI-compatible. Returns (body, headers); the
    inputs are not mutated.
    """
    if endpoint in GENERATE_ENDPOINTS:
        return shape_generate_body(server, body, dp_rank), headers
    extra = dp_rank_headers(server, dp_rank)
    if not extra:
        return body, headers
    return body, [*(h for h in headers if h[0].lower() != "x-data-parallel-rank"), *extra]
