"""The proxy path against the real router and a scripted upstream: bytes through, retries, failures."""

from __future__ import annotations

import json

import pytest

from gateway.upstream import UpstreamConnectError, UpstreamDisconnected, UpstreamRequest, UpstreamTimeout
from tests.gateway.http._fakes import MODEL, FakeResponse, Harness, sse, worker

A = "http://10.0.0.1:30000"
B = "http://10.0.0.2:30000"

CHAT_BODY = (
    b'{"model": "deepseek-ai/DeepSeek-V3",  "messages": [{"role": "user", "content": "Hello"}], "x": [1, 2]}'
)
CHAT_REPLY = (
    b'{"id":"abc","object":"chat.completion","created":1,"model":"deepseek-ai/DeepSeek-V3",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hi!"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3,'
    b'"prompt_tokens_details":{"cached_tokens":8}}}'
)


def always(response: FakeResponse) -> object:
    return lambda _request: response


async def test_chat_bytes_pass_through_both_ways_with_receipt() -> None:
    harness = Harness([worker(A, dp_size=4)], always(FakeResponse(200, [CHAT_REPLY[:40], CHAT_REPLY[40:]])))
    async with harness.client() as client:
        reply = await client.post(
            "/v1/chat/completions", content=CHAT_BODY, headers={"content-type": "application/json"}
        )
    assert reply.status_code == 200
    assert reply.content == CHAT_REPLY
    assert reply.headers["x-cachet-worker"] == A
    assert reply.headers["x-cachet-policy"] == "round_robin"
    assert {"x-cachet-dp-rank", "x-cachet-reason", "x-cachet-cached-tokens"} <= set(reply.headers)
    assert reply.headers["content-length"] == str(len(CHAT_REPLY))
    assert "server" not in reply.headers  # the upstream's own server header is not forwarded
    sent = harness.transport.requests[0]
    assert sent.url == A + "/v1/chat/completions"
    assert sent.body == CHAT_BODY  # not re-serialised: same spacing, unknown keys kept
    headers = dict((k.lower(), v) for k, v in sent.headers)
    assert headers["x-data-parallel-rank"] == reply.headers["x-cachet-dp-rank"]
    assert headers["content-type"] == "application/json"
    [(url, outcome)] = harness.router.outcomes
    assert url == A
    assert (
        outcome.ok
        and outcome.prompt_tokens == 12
        and outcome.cached_tokens == 8
        and outcome.completion_tokens == 3
    )


async def test_client_rank_header_is_replaced_by_the_routed_rank() -> None:
    harness = Harness([worker(A, dp_size=2)], always(FakeResponse(200, [CHAT_REPLY])))
    async with harness.client() as client:
        reply = await client.post(
            "/v1/chat/completions", content=CHAT_BODY, headers={"X-Data-Parallel-Rank": "7"}
        )
    ranks = [v for k, v in harness.transport.requests[0].headers if k.lower() == "x-data-parallel-rank"]
    assert ranks == [reply.headers["x-cachet-dp-rank"]]


async def test_generate_pins_rank_in_body_by_appending_only() -> None:
    body = b'{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4}}'
    reply_body = b'{"text":" Paris","meta_info":{"prompt_tokens":7,"completion_tokens":4,"cached_tokens":2}}'
    harness = Harness([worker(A, dp_size=8)], always(FakeResponse(200, [reply_body])))
    async with harness.client() as client:
        reply = await client.post("/generate", content=body)
    assert reply.status_code == 200 and reply.content == reply_body
    sent = harness.transport.requests[0].body
    rank = reply.headers["x-cachet-dp-rank"]
    # This version's dialect sends both spellings; either way only members are appended.
    assert sent.startswith(body[:-1] + b",") and sent.endswith(b'"routed_dp_rank":' + rank.encode() + b"}")
    assert harness.router.outcomes[0][1].cached_tokens == 2


async def test_generate_for_old_server_uses_data_parallel_rank() -> None:
    body = b'{"input_ids": [1, 2, 3]}'
    harness = Harness([worker(A, dp_size=2, version="0.4.9")], always(FakeResponse(200, [b"{}"])))
    async with harness.client() as client:
        await client.post("/generate", content=body)
    assert b'"data_parallel_rank":' in harness.transport.requests[0].body


async def test_generate_batch_is_not_pinned() -> None:
    body = b'{"text": ["a", "b"]}'
    harness = Harness([worker(A, dp_size=2)], always(FakeResponse(200, [b"[{}, {}]"])))
    async with harness.client() as client:
        reply = await client.post("/generate", content=body)
        metrics = (await client.get("/metrics")).text
    assert reply.status_code == 200
    assert harness.transport.requests[0].body == body
    # The server picks the ranks of a batch: the receipt names the server but claims no rank.
    assert reply.headers["x-cachet-worker"] == A
    assert "x-cachet-dp-rank" not in reply.headers
    assert 'cachet_routing_decisions_total{policy="round_robin",worker="' + A + '",dp_rank=""}' in metrics


async def test_generate_id_batch_claims_no_rank() -> None:
    body = b'{"input_ids": [[1, 2], [3, 4]]}'
    harness = Harness([worker(A, dp_size=4)], always(FakeResponse(200, [b"[{}, {}]"])))
    async with harness.client() as client:
        reply = await client.post("/generate", content=body)
    assert reply.status_code == 200 and harness.transport.requests[0].body == body
    assert "x-cachet-dp-rank" not in reply.headers


async def test_stream_passes_bytes_and_reads_usage_from_last_event_only() -> None:
    events = sse(
        b'{"choices":[{"delta":{"role":"assistant","content":""}}]}',
        b'{"choices":[{"delta":{"content":"Hi"}}],"usage":{"prompt_tokens":999}}',
        b'{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}',
    )
    raw = b"".join(events)
    # Split across reads at odd places, as a socket would.
    chunks = [raw[:7], raw[7:90], raw[90:91], raw[91:]]
    harness = Harness([worker(A)], always(FakeResponse(200, chunks, content_type="text/event-stream")))
    async with harness.client() as client:
        reply = await client.post(
            "/v1/chat/completions", content=CHAT_BODY.replace(b'"x"', b'"stream": true, "x"')
        )
    assert reply.status_code == 200
    assert reply.content == raw
    assert reply.headers["content-type"] == "text/event-stream"
    [(_, outcome)] = harness.router.outcomes
    assert outcome.ok and outcome.prompt_tokens == 12 and outcome.cached_tokens == 4
    assert outcome.ttft_s is not None and outcome.ttft_s >= 0
    assert harness.transport.responses[0].closed


async def test_generate_stream_reads_meta_info_of_the_last_chunk() -> None:
    events = sse(
        b'{"text":"a","meta_info":{"prompt_tokens":5,"completion_tokens":1,"cached_tokens":0}}',
        b'{"text":"a data: b","meta_info":{"prompt_tokens":5,"completion_tokens":2,"cached_tokens":3}}',
    )
    harness = Harness([worker(A)], always(FakeResponse(200, events, content_type="text/event-stream")))
    async with harness.client() as client:
        reply = await client.post("/generate", content=b'{"text": "hi", "stream": true}')
    assert reply.content == b"".join(events)
    outcome = harness.router.outcomes[0][1]
    assert (outcome.completion_tokens, outcome.cached_tokens) == (2, 3)


@pytest.mark.parametrize(
    "failure",
    [UpstreamConnectError("refused"), UpstreamTimeout("no headers"), UpstreamDisconnected("reset")],
    ids=["connect", "timeout", "disconnect"],
)
async def test_failure_before_headers_is_retried_on_another_worker(failure: Exception) -> None:
    def script(request: UpstreamRequest) -> FakeResponse:
        if request.url.startswith(A):
            raise failure
        return FakeResponse(200, [CHAT_REPLY])

    harness = Harness([worker(A), worker(B)], script)
    async with harness.client() as client:
        for _ in range(2):  # round robin: one of the two requests starts on A
            reply = await client.post("/v1/chat/completions", content=CHAT_BODY)
            assert reply.status_code == 200 and reply.content == CHAT_REPLY
            assert reply.headers["x-cachet-worker"] == B
    tried = [r.url.split("/v1")[0] for r in harness.transport.requests]
    assert tried == [A, B, A, B]  # round robin starts each request on the next worker
    assert [(url, o.ok) for url, o in harness.router.outcomes] == [
        (A, False),
        (B, True),
        (A, False),
        (B, True),
    ]
    # Connect failures are reported to the registry (they count toward taking A out).
    assert harness.registry.failures == ([A, A] if isinstance(failure, UpstreamConnectError) else [])


async def test_5xx_before_body_is_retried_and_first_chunk_failure_too() -> None:
    def script(request: UpstreamRequest) -> FakeResponse:
        if request.url.startswith(A):
            return FakeResponse(500, [b'{"object":"error","message":"boom"}'])
        return FakeResponse(
            200,
            [],
            content_type="text/event-stream",
            fail_with=UpstreamDisconnected("died before first byte"),
        )

    harness = Harness([worker(A), worker(B)], script)
    async with harness.client() as client:
        reply = await client.post("/v1/chat/completions", content=CHAT_BODY)
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "upstream_unavailable"
    assert len(harness.transport.requests) == 2
    assert all(response.closed for response in harness.transport.responses)
    assert [o.ok for _, o in harness.router.outcomes] == [False, False]


async def test_upstream_overload_answers_503_with_retry_after_when_all_fail() -> None:
    harness = Harness(
        [worker(A), worker(B)],
        always(FakeResponse(503, [b'{"message":"The request queue is full."}'])),
        retries=5,
    )
    async with harness.client() as client:
        reply = await client.post("/v1/chat/completions", content=CHAT_BODY)
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "2"
    assert "queue is full" in reply.json()["error"]["message"]
    # Two workers: each tried once, then nothing healthy is left to try.
    assert len(harness.transport.requests) == 2


async def test_retries_are_bounded() -> None:
    workers = [worker(f"http://10.0.0.{i}:30000") for i in range(1, 6)]

    def script(request: UpstreamRequest) -> FakeResponse:
        raise UpstreamConnectError("refused")

    harness = Harness(workers, script, retries=2)
    async with harness.client() as client:
        reply = await client.post("/v1/chat/completions", content=CHAT_BODY)
    assert reply.status_code == 502
    assert len(harness.transport.requests) == 3


async def test_timeout_everywhere_answers_504() -> None:
    def script(request: UpstreamRequest) -> FakeResponse:
        raise UpstreamTimeout("no headers in time")

    harness = Harness([worker(A)], script)
    async with harness.client() as client:
        reply = await client.post(
            "/v1/completions", content=b'{"model": "deepseek-ai/DeepSeek-V3", "prompt": "x"}'
        )
    assert reply.status_code == 504
    assert reply.json()["error"]["code"] == "upstream_timeout"


async def test_mid_stream_failure_ends_with_error_event_and_done() -> None:
    first = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    harness = Harness(
        [worker(A), worker(B)],
        always(
            FakeResponse(
                200, [first], content_type="text/event-stream", fail_with=UpstreamDisconnected("reset")
            )
        ),
    )
    async with harness.client() as client:
        reply = await client.post("/v1/chat/completions", content=CHAT_BODY)
    assert reply.status_code == 200
    assert reply.content.startswith(first)
    tail = reply.content[len(first) :]
    assert tail.endswith(b"data: [DONE]\n\n")
    event = json.loads(tail.split(b"\n\n")[0].removeprefix(b"data: "))
    assert set(event["error"]) == {"message", "type", "param", "code"}
    assert event["error"]["code"] == "upstream_disconnected"
    assert len(harness.transport.requests) == 1  # never retried after the client saw bytes
    assert harness.router.outcomes[0][1].ok is False


async def test_upstream_4xx_passes_through_unchanged() -> None:
    error = (
        b'{"object":"error","message":"Messages cannot be empty.",'
        b'"type":"BadRequestError","param":null,"code":400}'
    )
    harness = Harness([worker(A), worker(B)], always(FakeResponse(400, [error])))
    async with harness.client() as client:
        reply = await client.post("/v1/chat/completions", content=CHAT_BODY)
    assert reply.status_code == 400
    assert reply.content == error
    assert len(harness.transport.requests) == 1


async def test_error_event_in_final_chunk_marks_outcome_failed() -> None:
    events = sse(b'{"error":{"message":"too long","type":"invalid_request_error","code":400}}')
    harness = Harness([worker(A)], always(FakeResponse(200, events, content_type="text/event-stream")))
    async with harness.client() as client:
        reply = await client.post("/generate", content=b'{"text": "x", "stream": true}')
    assert reply.content == b"".join(events)
    assert harness.router.outcomes[0][1].ok is False


async def test_several_models_route_on_model() -> None:
    other = "deepseek-ai/DeepSeek-R1"
    harness = Harness([worker(A), worker(B, model=other)], always(FakeResponse(200, [b"{}"])))
    async with harness.client() as client:
        for _ in range(3):
            reply = await client.post(
                "/v1/completions", content=json.dumps({"model": other, "prompt": "x"}).encode()
            )
            assert reply.headers["x-cachet-worker"] == B
        reply = await client.post("/generate", content=b'{"model": "deepseek-ai/DeepSeek-V3", "text": "x"}')
        assert reply.headers["x-cachet-worker"] == A
        reply = await client.post("/generate", content=b'{"text": "x"}')
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "model"


async def test_generate_without_model_uses_the_only_model() -> None:
    harness = Harness([worker(A)], always(FakeResponse(200, [b"{}"])))
    async with harness.client() as client:
        reply = await client.post("/generate", content=b'{"input_ids": [[1, 2], [3]]}')
    assert reply.status_code == 200
    assert harness.router.inner.recent_decisions(1)[0]["model"] == MODEL
