"""Prefill/decode disaggregation: the bootstrap fields that pair a prefill and a decode request.

The same body goes to a prefill and a decode server at once, both carrying ``bootstrap_host`` (the
prefill host), ``bootstrap_port`` (the prefill's bootstrap server) and ``bootstrap_room`` (a random
63-bit id that names the KV transfer). A decode request also gets ``disagg_prefill_dp_rank`` when
the prefill server has several DP ranks and the router chose one, so decode need not ask which rank
holds the KV.
"""

from __future__ import annotations

import random
from typing import Protocol
from urllib.parse import urlsplit

import msgspec

from backends.sglang.shaping import (
    GENERATE_ENDPOINTS,
    ServerLike,
    append_json_members,
    dp_rank_headers,
    rank_members,
)

# SGLang's default --disaggregation-bootstrap-port, used when neither the spec nor the server said.
DEFAULT_BOOTSTRAP_PORT = 8998


class PrefillServerLike(ServerLike, Protocol):
    @property
    def bootstrap_port(self) -> int | None: ...


class Bootstrap(msgspec.Struct, frozen=True):
    """The pairing of one request (or one per batch item) with a prefill server."""

    host: str
    port: int
    rooms: tuple[int, ...]

    @property
    def room(self) -> int:
        return self.rooms[0]


def new_bootstrap_room(rng: random.Random) -> int:
    """A random non-negative 63-bit room id (fits SGLang's signed and unsigned 64-bit fields)."""
    return rng.getrandbits(63)


def bootstrap_for(prefill: PrefillServerLike, rng: random.Random, batch_size: int | None = None) -> Bootstrap:
    host = urlsplit(prefill.url).hostname
    if not host:
        raise ValueError(f"prefill URL {prefill.url!r} has no host")
    port = prefill.bootstrap_port if prefill.bootstrap_port is not None else DEFAULT_BOOTSTRAP_PORT
    count = 1 if batch_size is None else batch_size
    if count < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return Bootstrap(host=host, port=port, rooms=tuple(new_bootstrap_room(rng) for _ in range(count)))


def bootstrap_members(bootstrap: Bootstrap, batch: bool = False) -> bytes:
    if batch:
        n = len(bootstrap.rooms)
        fields: dict[str, object] = {
            "bootstrap_host": [bootstrap.host] * n,
            "bootstrap_port": [bootstrap.port] * n,
            "bootstrap_room": list(bootstrap.rooms),
        }
    else:
        fields = {
            "bootstrap_host": bootstrap.host,
            "bootstrap_port": bootstrap.port,
            "bootstrap_room": bootstrap.room,
        }
    return msgspec.json.encode(fields)[1:-1]


class PdRequests(msgspec.Struct, frozen=True):
    prefill_body: bytes
    prefill_headers: list[tuple[str, str]]
    decode_body: bytes
    decode_headers: list[tuple[str, str]]


def shape_pd_requests(
    *,
    endpoint: str,
    body: bytes,
    headers: list[tuple[str, str]],
    bootstrap: Bootstrap,
    prefill: ServerLike,
    prefill_dp_rank: int | None,
    decode: ServerLike,
    decode_dp_rank: int | None,
    batch: bool = False,
) -> PdRequests:
    """The two requests of one PD exchange, each pinned to its rank the way its endpoint expects."""
    common = bootstrap_members(bootstrap, batch)
    hint = b""
    if prefill_dp_rank is not None and prefill.dp_size > 1:
        hint = b',"disagg_prefill_dp_rank":' + str(prefill_dp_rank).encode()
    if endpoint in GENERATE_ENDPOINTS:
        prefill_rank = rank_members(prefill, None if batch else prefill_dp_rank)
        decode_rank = rank_members(decode, None if batch else decode_dp_rank)
        prefill_members = common + (b"," + prefill_rank if prefill_rank else b"")
        decode_members = common + hint + (b"," + decode_rank if decode_rank else b"")
        return PdRequests(
            prefill_body=append_json_members(body, prefill_members),
            prefill_headers=headers,
            decode_body=append_json_members(body, decode_members),
            decode_headers=headers,
        )
    return PdRequests(
        prefill_body=append_json_members(body, common),
        prefill_headers=[*headers, *dp_rank_headers(prefill, prefill_dp_rank)],
        decode_body=append_json_members(body, common + hint),
        decode_headers=[*headers, *dp_rank_headers(decode, decode_dp_rank)],
    )
