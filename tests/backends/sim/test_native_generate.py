"""/generate pinned against the wire-protocol reference: shapes, key order, framing, batch, n>1."""

from __future__ import annotations

import itertools
import json

import httpx

from backends.sim import SimServer
from backends.sim.engine import Tokenizer

from .conftest import StartServer, sse_events

META_KEYS = [
    "id",
    "finish_reason",
    "prompt_tokens",
    "weight_version",
    "num_retractions",
    "reasoning_tokens",
    "completion_tokens",
    "cached_tokens",
    "cached_tokens_details",
    "dp_rank",
    "e2e_latency",
    "response_sent_to_client_ts",
]


async def test_single_non_streaming_shape_and_headers(start_server: StartServer) -> None:
    server = await start_server(dp_size=2)  # no --enable-metrics: its timing keys would join meta_info
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post(
            "/generate", json={"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4}}
        )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["server"] == "uvicorn"
    assert "date" in r.headers
    assert int(r.headers["content-length"]) == len(r.content)
    assert b": " not in r.content and b", " not in r.content.split(b'"text"')[0]  # compact JSON
    body = r.json()
    assert list(body) == ["text", "output_ids", "meta_info"]
    meta = body["meta_info"]
    assert list(meta) == META_KEYS
    assert len(meta["id"]) == 32
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["completion_tokens"] == 4 == len(body["output_ids"])
    assert meta["dp_rank"] in (0, 1)
    assert meta["prompt_tokens"] > 0
    assert isinstance(body["text"], str) and body["text"]


async def test_input_ids_and_put_method(client: httpx.AsyncClient) -> None:
    r = await client.put(
        "/generate", json={"input_ids": [1, 2, 3, 4, 5], "sampling_params": {"max_new_tokens": 2}}
    )
    assert r.status_code == 200
    assert r.json()["meta_info"]["prompt_tokens"] == 5


async def test_dp_rank_null_when_dp_size_one(start_server: StartServer) -> None:
    server = await start_server(dp_size=1)
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 1}})
    assert r.json()["meta_info"]["dp_rank"] is None


async def test_batch_and_n_return_arrays_with_derived_rids(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate", json={"text": ["a b c", "d e f"], "rid": "job", "sampling_params": {"max_new_tokens": 2}}
    )
    body = r.json()
    assert isinstance(body, list) and len(body) == 2
    assert [x["meta_info"]["id"] for x in body] == ["job_0", "job_1"]
    r = await client.post("/generate", json={"text": "one", "sampling_params": {"max_new_tokens": 2, "n": 3}})
    body = r.json()
    assert isinstance(body, list) and len(body) == 3
    assert len({x["meta_info"]["id"] for x in body}) == 3


async def test_stream_is_cumulative_with_timestamps_on_first_and_last(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate",
        json={"text": "Once upon a time", "stream": True, "sampling_params": {"max_new_tokens": 5}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.headers["transfer-encoding"] == "chunked"
    events = sse_events(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 5
    for i, chunk in enumerate(chunks):
        assert list(chunk) == ["text", "output_ids", "meta_info"]
        assert len(chunk["output_ids"]) == i + 1
        assert chunk["meta_info"]["completion_tokens"] == i + 1
        has_ts = "response_sent_to_client_ts" in chunk["meta_info"]
        assert has_ts == (i in (0, 4))
    for prev, cur in itertools.pairwise(chunks):
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
        assert prev["meta_info"]["finish_reason"] is None
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 5}


async def test_incremental_streaming_output(start_server: StartServer) -> None:
    server = await start_server(incremental_streaming_output=True)
    async with httpx.AsyncClient(base_url=server.url) as c:
        unary = (
            await c.post("/generate", json={"text": "abc", "sampling_params": {"max_new_tokens": 4}})
        ).json()
        r = await c.post(
            "/generate", json={"text": "abc", "stream": True, "sampling_params": {"max_new_tokens": 4}}
        )
    chunks = [json.loads(e) for e in sse_events(r.content)[:-1]]
    assert all(len(c["output_ids"]) == 1 for c in chunks)
    assert "".join(c["text"] for c in chunks) == unary["text"]  # deterministic text for the same prompt


async def test_batch_stream_chunks_carry_index(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate",
        json={
            "text": ["first prompt", "second prompt"],
            "stream": True,
            "sampling_params": {"max_new_tokens": 3},
        },
    )
    chunks = [json.loads(e) for e in sse_events(r.content)[:-1]]
    assert len(chunks) == 6
    assert {c["index"] for c in chunks} == {0, 1}
    assert all(list(c)[-1] == "index" for c in chunks)
    finals = [c for c in chunks if c["meta_info"]["finish_reason"] is not None]
    assert sorted(c["index"] for c in finals) == [0, 1]


async def test_stream_interval_groups_tokens(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate",
        json={"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 6, "stream_interval": 3}},
    )
    chunks = [json.loads(e) for e in sse_events(r.content)[:-1]]
    assert [len(c["output_ids"]) for c in chunks] == [3, 6]


async def test_stop_string_trims_and_reports_matched(client: httpx.AsyncClient) -> None:
    base = (
        await client.post("/generate", json={"text": "stop test", "sampling_params": {"max_new_tokens": 12}})
    ).json()
    words = base["text"].split(" ")
    stop = " " + words[3]
    r = await client.post(
        "/generate", json={"text": "stop test", "sampling_params": {"max_new_tokens": 12, "stop": stop}}
    )
    body = r.json()
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert body["text"] == base["text"][: base["text"].index(stop)]


async def test_ignore_eos_and_max_new_tokens_default_128(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"input_ids": [7, 8, 9], "sampling_params": {"ignore_eos": True}})
    meta = r.json()["meta_info"]
    assert meta["completion_tokens"] == 128
    assert meta["finish_reason"] == {"type": "length", "length": 128}


async def test_old_server_sends_short_meta_info(start_server: StartServer) -> None:
    server: SimServer = await start_server(sglang_version="0.5.0")
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 1}})
    assert list(r.json()["meta_info"]) == [
        "id",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "e2e_latency",
    ]


async def test_return_logprob_lists(client: httpx.AsyncClient) -> None:
    body = {
        "input_ids": [11, 12, 13, 14],
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 3,
        "sampling_params": {"max_new_tokens": 3},
    }
    meta = (await client.post("/generate", json=body)).json()["meta_info"]
    keys = list(meta)
    assert keys.index("input_token_logprobs") < keys.index("completion_tokens")
    assert [e[1] for e in meta["input_token_logprobs"]] == [11, 12, 13, 14]
    assert meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_token_logprobs"]) == 3
    for entry, top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True):
        assert entry[0] <= 0 and top[0] == entry and len(top) == 3
        assert all(t[0] < entry[0] for t in top[1:])
    again = (await client.post("/generate", json=body)).json()["meta_info"]
    assert again["output_token_logprobs"] == meta["output_token_logprobs"]  # deterministic
    plain = await client.post(
        "/generate", json={"input_ids": [11, 12], "sampling_params": {"max_new_tokens": 1}}
    )
    assert "input_token_logprobs" not in plain.json()["meta_info"]


async def test_stop_string_straddling_two_tokens_is_trimmed(client: httpx.AsyncClient) -> None:
    params = {"max_new_tokens": 12, "ignore_eos": True}
    base = (await client.post("/generate", json={"text": "straddle", "sampling_params": params})).json()
    boundary = len(Tokenizer().decode(base["output_ids"][:4]))
    stop = base["text"][boundary - 2 : boundary + 2]
    body = (
        await client.post("/generate", json={"text": "straddle", "sampling_params": {**params, "stop": stop}})
    ).json()
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert body["text"] == base["text"][: base["text"].index(stop)]
    r = await client.post(
        "/generate", json={"text": "straddle", "stream": True, "sampling_params": {**params, "stop": stop}}
    )
    last = json.loads(sse_events(r.content)[-2])
    assert last["text"] == body["text"]
