"""Rank pinning and PD shaping for servers of each age, checked by decoding the shaped bytes."""

from __future__ import annotations

import datetime as dt
import json
import random

import msgspec
import pytest

from backends.sglang import (
    DEFAULT_BOOTSTRAP_PORT,
    NotAJsonObject,
    RankKey,
    append_json_members,
    bootstrap_for,
    dialect,
    release_date,
    shape_generate_body,
    shape_pd_requests,
    shape_request,
)


class Server(msgspec.Struct, frozen=True):
    url: str = "http://127.0.0.1:30000"
    version: str = "0.5.6"
    dp_size: int = 8
    bootstrap_port: int | None = None


OLD = Server(version="0.5.4")  # released 2025-10, before routed_dp_rank (2026-02-24)
UNDATED = Server(version="0.5.15")  # newer than the release table: age unknown
EMPTY_VERSION = Server(version="")


def test_dialects_by_version() -> None:
    assert dialect("0.5.4").rank_key is RankKey.DATA_PARALLEL_RANK
    assert dialect("0.4.9").rank_key is RankKey.DATA_PARALLEL_RANK
    assert dialect("0.5.15").rank_key is RankKey.BOTH
    assert dialect("").rank_key is RankKey.BOTH
    assert dialect("nonsense").rank_key is RankKey.BOTH
    assert dialect("0.5.4").loads_path == "/get_load"
    assert dialect("0.5.15").loads_path == "/v1/loads"
    assert dialect("0.5.4").server_info_path == "/get_server_info"
    assert dialect("0.5.6").server_info_path == "/server_info"
    assert release_date("v0.5.3rc0") == release_date("0.5.3.post1") == release_date("0.5.3")
    assert release_date("0.3.0") == release_date("0.4.6")  # older than the table: predates every change


def test_old_server_gets_data_parallel_rank() -> None:
    shaped = shape_generate_body(OLD, b'{"text":"hi","sampling_params":{"max_new_tokens":4}}', 3)
    decoded = json.loads(shaped)
    assert decoded == {"text": "hi", "sampling_params": {"max_new_tokens": 4}, "data_parallel_rank": 3}


def test_undated_server_gets_both_keys_with_the_same_rank() -> None:
    decoded = json.loads(shape_generate_body(UNDATED, b'{"text":"hi"}', 5))
    assert decoded == {"text": "hi", "data_parallel_rank": 5, "routed_dp_rank": 5}
    assert json.loads(shape_generate_body(EMPTY_VERSION, b'{"text":"hi"}', 0))["routed_dp_rank"] == 0


def test_server_dated_after_the_rename_gets_routed_dp_rank_only() -> None:
    # No built-in release is dated after 2026-02-24; an operator-supplied table can date one.
    table = {(0, 5, 6): dt.date(2025, 12, 3), (0, 5, 15): dt.date(2026, 7, 14)}
    assert dialect("0.5.15", table).rank_key is RankKey.ROUTED_DP_RANK
    assert dialect("0.5.10", table).rank_key is RankKey.ROUTED_DP_RANK  # bounded by the next listed
    assert dialect("0.5.16", table).rank_key is RankKey.BOTH
    assert dialect("0.5.6", table).rank_key is RankKey.DATA_PARALLEL_RANK
    assert dialect("0.5.15", table).loads_path == "/v1/loads"


def test_no_rank_for_dp_size_one_or_none() -> None:
    body = b'{"text":"hi"}'
    assert shape_generate_body(Server(dp_size=1), body, 0) is body
    assert shape_generate_body(OLD, body, None) is body


def test_rank_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        shape_generate_body(OLD, b"{}", 8)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", {"k": 1}),
        (b"  { }  \n", {"k": 1}),
        (b'{"a":[1,{"b":"}"}]}', {"a": [1, {"b": "}"}], "k": 1}),
        (b'\n{"a": "x" }\r\n', {"a": "x", "k": 1}),
    ],
)
def test_members_appended_to_any_object(body: bytes, expected: dict[str, object]) -> None:
    assert json.loads(append_json_members(body, b'"k":1')) == expected


def test_gateway_rank_wins_over_a_client_supplied_one() -> None:
    shaped = shape_generate_body(OLD, b'{"text":"hi","data_parallel_rank":0}', 6)
    assert json.loads(shaped)["data_parallel_rank"] == 6  # last duplicate wins in SGLang's parsers


@pytest.mark.parametrize("body", [b'[{"text":"a"}]', b"", b"   ", b'"text"', b"{", b"42"])
def test_non_object_bodies_are_refused_not_mangled(body: bytes) -> None:
    with pytest.raises(NotAJsonObject):
        append_json_members(body, b'"k":1')


def test_openai_endpoints_get_the_header_not_a_body_edit() -> None:
    body = b'{"model":"m","messages":[]}'
    headers = [("content-type", "application/json"), ("X-Data-Parallel-Rank", "0")]
    shaped_body, shaped_headers = shape_request(OLD, "chat", body, headers, 4)
    assert shaped_body is body
    assert shaped_headers == [("content-type", "application/json"), ("X-Data-Parallel-Rank", "4")]
    assert headers[1] == ("X-Data-Parallel-Rank", "0")  # the caller's list is not mutated
    assert shape_request(Server(dp_size=1), "/v1/completions", body, headers, 0) == (body, headers)


def test_generate_endpoint_edits_the_body() -> None:
    shaped_body, shaped_headers = shape_request(OLD, "/generate", b'{"text":"x"}', [], 1)
    assert json.loads(shaped_body)["data_parallel_rank"] == 1
    assert shaped_headers == []


def test_pd_generate_pairs_prefill_and_decode() -> None:
    prefill = Server(url="http://10.0.0.5:30000", version="0.5.4", dp_size=4, bootstrap_port=9001)
    decode = Server(url="http://10.0.0.6:30000", version="0.5.15", dp_size=8)
    bootstrap = bootstrap_for(prefill, random.Random(7))
    assert 0 <= bootstrap.room < 2**63
    pd = shape_pd_requests(
        endpoint="generate",
        body=b'{"text":"hello","stream":true}',
        headers=[],
        bootstrap=bootstrap,
        prefill=prefill,
        prefill_dp_rank=2,
        decode=decode,
        decode_dp_rank=5,
    )
    p = json.loads(pd.prefill_body)
    d = json.loads(pd.decode_body)
    for body in (p, d):
        assert body["bootstrap_host"] == "10.0.0.5"
        assert body["bootstrap_port"] == 9001
        assert body["bootstrap_room"] == bootstrap.room
        assert body["text"] == "hello"
    assert p["data_parallel_rank"] == 2 and "disagg_prefill_dp_rank" not in p
    assert d["disagg_prefill_dp_rank"] == 2
    assert d["routed_dp_rank"] == 5


def test_pd_openai_uses_headers_for_ranks_and_default_bootstrap_port() -> None:
    prefill = Server(url="http://127.0.0.1:30001", dp_size=1, bootstrap_port=None)
    decode = Server(url="http://127.0.0.1:30002", dp_size=2)
    pd = shape_pd_requests(
        endpoint="chat",
        body=b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
        headers=[("content-type", "application/json")],
        bootstrap=bootstrap_for(prefill, random.Random(1)),
        prefill=prefill,
        prefill_dp_rank=0,
        decode=decode,
        decode_dp_rank=1,
    )
    assert json.loads(pd.prefill_body)["bootstrap_port"] == DEFAULT_BOOTSTRAP_PORT
    assert "disagg_prefill_dp_rank" not in json.loads(pd.decode_body)  # prefill has one rank
    assert pd.prefill_headers == [("content-type", "application/json")]
    assert pd.decode_headers == [("content-type", "application/json"), ("X-Data-Parallel-Rank", "1")]


def test_pd_batch_gets_one_room_per_item() -> None:
    prefill = Server(url="http://127.0.0.1:30001", dp_size=2, bootstrap_port=8998)
    bootstrap = bootstrap_for(prefill, random.Random(3), batch_size=3)
    pd = shape_pd_requests(
        endpoint="generate",
        body=b'{"text":["a","b","c"]}',
        headers=[],
        bootstrap=bootstrap,
        prefill=prefill,
        prefill_dp_rank=None,
        decode=Server(dp_size=1),
        decode_dp_rank=None,
        batch=True,
    )
    p = json.loads(pd.prefill_body)
    assert p["bootstrap_host"] == ["127.0.0.1"] * 3
    assert p["bootstrap_port"] == [8998] * 3
    assert len(set(p["bootstrap_room"])) == 3
    assert "data_parallel_rank" not in p


def test_rooms_are_random_63_bit() -> None:
    prefill = Server(bootstrap_port=1)
    rng = random.Random(0)
    rooms = {bootstrap_for(prefill, rng).room for _ in range(200)}
    assert len(rooms) == 200
    assert all(0 <= room < 2**63 for room in rooms)
    assert max(rooms) > 2**62  # uses the high bits
