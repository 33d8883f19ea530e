"""/v1/chat/completions, /v1/completions, /v1/models: SGLang's shapes, raw and via the openai package."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from backends.sim import SimServer

from .conftest import StartServer, sse_events

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]}


async def test_chat_non_streaming_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5, "model": "whatever"})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "usage", "metadata"]
    assert len(body["id"]) == 32 and not body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "whatever"  # echoed, not validated
    (choice,) = body["choices"]
    assert list(choice) == ["index", "message", "logprobs", "finish_reason", "matched_stop"]
    assert list(choice["message"]) == ["role", "content", "reasoning_content", "tool_calls"]
    assert choice["finish_reason"] == "length" and choice["matched_stop"] is None
    usage = body["usage"]
    assert list(usage) == [
        "prompt_tokens",
        "total_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "reasoning_tokens",
    ]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert body["metadata"] == {"weight_version": "default"}


async def test_chat_default_max_tokens_runs_to_natural_stop(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json=CHAT)).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(choice["matched_stop"], int)


async def test_chat_stream_role_content_separate_finish_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = sse_events(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    role, *contents, finish, usage = chunks
    assert role["choices"][0]["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert list(role) == ["id", "object", "created", "model", "choices"]
    assert list(role["choices"][0]) == ["index", "delta", "logprobs", "finish_reason", "matched_stop"]
    assert len(contents) == 3
    for c in contents:
        assert list(c["choices"][0]["delta"]) == ["reasoning_content", "content"]
        assert c["choices"][0]["finish_reason"] is None
    assert finish["choices"][0]["delta"] == {"reasoning_content": None}
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 3
    assert "prompt_tokens_details" in usage["usage"]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_chat_stream_without_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.content)[:-1]]
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


async def test_completions_stream_carries_usage_null_and_finish_on_last_text(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": "Say something",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = [json.loads(e) for e in sse_events(r.content)[:-1]]
    *texts, usage = chunks
    assert len(texts) == 3
    for c in texts:
        assert list(c) == ["id", "object", "created", "model", "choices", "usage"]
        assert c["usage"] is None and c["object"] == "text_completion"
        assert list(c["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "matched_stop"]
    assert texts[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert "prompt_tokens_details" not in usage["usage"]  # exclude_none, and the prompt was not cached


async def test_completions_defaults_to_16_tokens(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "Count", "ignore_eos": True})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 16
    assert list(body["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "matched_stop"]


async def test_cache_report_only_with_flag_and_hits(start_server: StartServer) -> None:
    prompt = "shared prefix " * 40
    plain = await start_server()
    async with httpx.AsyncClient(base_url=plain.url) as c:
        for _ in range(2):
            body = (await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})).json()
        assert body["usage"]["prompt_tokens_details"] is None
    reporting = await start_server(enable_cache_report=True)
    async with httpx.AsyncClient(base_url=reporting.url) as c:
        first = (await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})).json()
        second = (await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})).json()
    assert (
        first["usage"]["prompt_tokens_details"] is None
        or first["usage"]["prompt_tokens_details"]["cached_tokens"]
        < second["usage"]["prompt_tokens_details"]["cached_tokens"]
    )
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 80


async def test_n_choices_and_usage_counts_prompt_once(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json={**CHAT, "n": 2, "max_tokens": 3})).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    single = (await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})).json()
    assert body["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == 6


async def test_models_list_and_lookup(start_server: StartServer) -> None:
    server = await start_server(served_model_name="deepseek-v3", context_length=32768)
    async with httpx.AsyncClient(base_url=server.url) as c:
        body = (await c.get("/v1/models")).json()
        assert body["object"] == "list"
        (card,) = body["data"]
        assert list(card) == ["id", "object", "created", "owned_by", "root", "parent", "max_model_len"]
        assert card["id"] == "deepseek-v3" and card["max_model_len"] == 32768 and card["owned_by"] == "sglang"
        assert (await c.get("/v1/models/deepseek-v3")).json()["id"] == "deepseek-v3"
        missing = await c.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_official_openai_client_streaming_and_not(server: SimServer) -> None:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        stream = await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        text = ""
        usage = None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == reply.choices[0].message.content  # same prompt, same deterministic text
        assert usage is not None and usage.completion_tokens == 4
        completion = await client.completions.create(model="default", prompt="abc", max_tokens=2)
        assert completion.choices[0].text
        cstream = await client.completions.create(model="default", prompt="abc", max_tokens=2, stream=True)
        pieces = [c.choices[0].text async for c in cstream if c.choices]
        assert "".join(pieces) == completion.choices[0].text
        models = await client.models.list()
        assert [m.id for m in models.data] == [server.settings.model_name]
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="default", messages=[], max_tokens=1)
    finally:
        await client.close()


async def test_logprobs_chat_and_completions(server: SimServer) -> None:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    try:
        msgs: Any = [{"role": "user", "content": "logprobs please"}]
        reply = await client.chat.completions.create(
            model="default", messages=msgs, max_tokens=4, logprobs=True, top_logprobs=2
        )
        content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None and len(content) == 4
        assert "".join(c.token for c in content) == reply.choices[0].message.content
        assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
        stream = await client.chat.completions.create(
            model="default", messages=msgs, max_tokens=4, logprobs=True, stream=True
        )
        streamed = [
            e.logprob
            async for chunk in stream
            if chunk.choices and chunk.choices[0].logprobs
            for e in (chunk.choices[0].logprobs.content or [])
        ]
        assert streamed == [c.logprob for c in content]
        completion = await client.completions.create(model="default", prompt="abc", max_tokens=3, logprobs=2)
        lp = completion.choices[0].logprobs
        assert lp is not None and lp.tokens is not None and len(lp.tokens) == 3
        assert "".join(lp.tokens) == completion.choices[0].text
        assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
        assert lp.top_logprobs is not None and all(len(t) == 2 for t in lp.top_logprobs)
        plain = await client.chat.completions.create(model="default", messages=msgs, max_tokens=2)
        assert plain.choices[0].logprobs is None
    finally:
        await client.close()
