"""Decoding /server_info, /model_info, /v1/models, /v1/loads and /get_load in every historical shape."""

from __future__ import annotations

import msgspec
import pytest

from backends.sglang import (
    RankLoadReport,
    parse_get_load,
    parse_model_info,
    parse_model_list,
    parse_server_info,
    parse_v1_loads,
)


def test_server_info_current() -> None:
    info = parse_server_info(
        b'{"model_path":"deepseek-ai/DeepSeek-V3","served_model_name":"ds","tp_size":8,"dp_size":8,'
        b'"disaggregation_mode":"prefill","disaggregation_bootstrap_port":8998,"page_size":64,'
        b'"max_total_num_tokens":500000,"version":"0.5.15","status":"ready",'
        b'"internal_states":[{"memory_usage":{"kvcache":1.0}}],"kv_events":null,"unknown":{"x":[1]}}'
    )
    assert info.served_name() == "ds"
    assert info.effective_dp_size() == 8
    assert info.page_size == 64
    assert info.disaggregation_bootstrap_port == 8998
    assert info.version == "0.5.15"


def test_server_info_dp_from_internal_states_and_name_from_path() -> None:
    info = parse_server_info(b'{"model_path":"m","internal_states":[{},{},{}]}')
    assert info.effective_dp_size() == 3
    assert info.served_name() == "m"
    assert parse_server_info(b"{}").effective_dp_size() == 1


def test_model_info_and_models() -> None:
    assert (
        parse_model_info(b'{"model_path":"m","is_generation":true,"architectures":["X"]}').model_path == "m"
    )
    models = parse_model_list(
        b'{"object":"list","data":[{"id":"ds","object":"model","max_model_len":163840,"parent":null}]}'
    )
    assert models.data[0].max_model_len == 163840


def test_v1_loads_current_shape() -> None:
    body = (
        b'{"timestamp":"2026-07-01T00:00:00Z","version":"0.5.15","loads":['
        b'{"timestamp":1.5,"dp_rank":0,"num_running_reqs":4,"num_waiting_reqs":2,"num_waiting_uncached_tokens":900,'
        b'"num_used_tokens":1000,"num_total_tokens":1200,"max_total_num_tokens":10000,"token_usage":0.1,'
        b'"gen_throughput":55.0,"cache_hit_rate":0.5,"utilization":0.3,'
        b'"disaggregation":{"mode":"null"},"queues":{"waiting":2}},'
        b'{"dp_rank":1,"num_running_reqs":0,"num_waiting_reqs":0,"num_used_tokens":0,"max_total_num_tokens":10000}]}'
    )
    reports = parse_v1_loads(body)
    assert reports[0] == RankLoadReport(
        dp_rank=0,
        running=4,
        waiting=2,
        used_tokens=1000,
        token_usage=0.1,
        waiting_uncached_tokens=900,
        gen_throughput=55.0,
        cache_hit_rate=0.5,
    )
    assert reports[1].token_usage == 0.0  # derived from used / max when absent


def test_v1_loads_with_aggregate_2026_01_to_05() -> None:
    body = (
        b'{"timestamp":"x","version":"0.5.9","dp_rank_count":1,'
        b'"aggregate":{"total_running_reqs":1,"total_waiting_reqs":0,"total_tokens":5},'
        b'"loads":[{"dp_rank":0,"num_running_reqs":1,"num_waiting_reqs":0,"token_usage":0.25}]}'
    )
    assert parse_v1_loads(body) == [RankLoadReport(dp_rank=0, running=1, waiting=0, token_usage=0.25)]


def test_get_load_current_shape_with_pending_tokens() -> None:
    body = (
        b'[{"dp_rank":0,"num_reqs":7,"num_waiting_reqs":3,"num_tokens":2500,'
        b'"num_pending_tokens":800,"ts_tic":1.0}]'
    )
    (report,) = parse_get_load(body, max_total_num_tokens=10000)
    assert (report.running, report.waiting, report.used_tokens) == (4, 3, 2500)
    assert report.token_usage == 0.25
    assert report.waiting_uncached_tokens == 800


def test_get_load_2025_09_shape() -> None:
    body = (
        b'[{"dp_rank":0,"num_reqs":2,"num_waiting_reqs":0,"num_tokens":10},'
        b'{"dp_rank":1,"num_reqs":1,"num_waiting_reqs":1,"num_tokens":0}]'
    )
    reports = parse_get_load(body)
    assert [(r.dp_rank, r.running, r.waiting) for r in reports] == [(0, 2, 0), (1, 0, 1)]
    assert reports[0].token_usage is None  # capacity unknown


def test_get_load_legacy_scalar() -> None:
    (report,) = parse_get_load(b'{"load":3000}', max_total_num_tokens=12000)
    assert report == RankLoadReport(dp_rank=0, running=None, waiting=None, used_tokens=3000, token_usage=0.25)


@pytest.mark.parametrize("body", [b"", b"not json", b'{"loads":"x"}', b"[1,2]"])
def test_malformed_load_bodies_raise_msgspec_errors(body: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        parse_v1_loads(body) if body.startswith(b"{") else parse_get_load(body)
