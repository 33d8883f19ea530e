"""PDForwarder against SGLang PD stand-ins on real sockets (see conftest.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from gateway.errors import GatewayError
from gateway.http._views import CHAT, COMPLETION, GENERATE, Endpoint, decode_view
from gateway.pd import PDForwarder, PDSettings, make_pd_forwarder
from policies.types import Role

CLIENT_HEADERS = [("content-type", "application/json")]
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


async def forward(forwarder: PDForwarder, endpoint: Endpoint, payload: dict[str, Any], client: Any) -> bool:
    body = msgspec.json.encode(payload)
    request = decode_view(endpoint, body, lambda: "m")
    return await forwarder.forward(
        endpoint=endpoint,
        request=request,
        body=body,
        headers=list(CLIENT_HEADERS),
        send=client.send,
        client=client,
    )


async def test_both_legs_get_the_same_bootstrap_fields_and_the_decode_answer_is_returned(
    pd_cluster: Any,
) -> None:
    cluster = await pd_cluster(prefill=1, decode=1, bootstrap_port=9123)
    client = cluster.client()
    forwarder = cluster.make()
    assert await forward(forwarder, CHAT, CHAT_BODY, client)
    decisions = forwarder.recent_decisions(5)
    assert [d["worker"] for d in decisions["prefill"]] == [cluster.prefill[0].url]
    assert [d["policy"] for d in decisions["decode"]] == ["decode_load"]
    (p,) = cluster.prefill[0].received
    (d,) = cluster.decode[0].received
    for leg in (p, d):
        assert leg.body["bootstrap_host"] == "127.0.0.1"
        assert leg.body["bootstrap_port"] == 9123
        assert leg.body["messages"] == CHAT_BODY["messages"]
    room = p.body["bootstrap_room"]
    assert isinstance(room, int) and 0 <= room < 2**63
    assert d.body["bootstrap_room"] == room
    assert "disagg_prefill_dp_rank" not in d.body  # prefill has one rank
    assert client.status == 200
    answer = msgspec.json.decode(client.body)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "abcd"
    headers = client.headers
    assert headers["x-cachet-worker"] == cluster.decode[0].url
    assert headers["x-cachet-prefill-worker"] == cluster.prefill[0].url
    assert headers["x-cachet-bootstrap-room"] == str(room)
    assert headers["x-cachet-policy"] == "pd:prefix_aware+decode_load"


async def test_the_legs_are_sent_concurrently(pd_cluster: Any) -> None:
    # The fake prefill answers only once the decode of its room has connected (SGLang's bootstrap
    # queue), so sending the legs one after the other would stall for 10 s; they must overlap.
    cluster = await pd_cluster()
    client = cluster.client()
    began = time.perf_counter()
    assert await forward(
        cluster.make(), GENERATE, {"text": "hi", "sampling_params": {"max_new_tokens": 4}}, client
    )
    assert time.perf_counter() - began < 2.0
    p, d = cluster.prefill[0].received[0], cluster.decode[0].received[0]
    assert abs(p.at - d.at) < 0.5
    assert client.status == 200


async def test_streaming_generate_passes_the_decode_stream_through(pd_cluster: Any) -> None:
    cluster = await pd_cluster()
    client = cluster.client()
    assert await forward(cluster.make(), GENERATE, {"text": "hi", "stream": True}, client)
    assert client.status == 200
    assert client.headers["content-type"].startswith("text/event-stream")
    events = [e for e in client.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 5
    assert msgspec.json.decode(events[3][6:])["text"] == "abcd"
    assert client.streaming and client.completing


async def test_prefill_failure_aborts_decode_within_a_second_then_answers_a_clear_error(
    pd_cluster: Any,
) -> None:
    cluster = await pd_cluster(prefill=1, decode=1)
    cluster.prefill[0].mode = "fail500"
    client = cluster.client()
    began = time.perf_counter()
    with pytest.raises(GatewayError) as raised:
        await forward(cluster.make(PDSettings(retries=0)), CHAT, CHAT_BODY, client)
    assert time.perf_counter() - began < 1.0
    error = raised.value
    assert error.status == 502
    assert "prefill server" in error.message and "prefill exploded" in error.message
    assert msgspec.json.decode(error.body())["error"]["code"] == "upstream_unavailable"
    assert not client.messages
    await asyncio.sleep(0.1)
    decode = cluster.decode[0]
    assert len(decode.cancelled_at) == 1
    assert decode.cancelled_at[0] - decode.received[0].at < 1.0


async def test_prefill_connection_drop_aborts_decode_and_retries_on_a_new_pair(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=2, decode=2)
    forwarder = cluster.make(PDSettings(retries=2))
    # Serve the prompt once, so prefix affinity sends the next one to the same prefill; break that one.
    assert await forward(forwarder, CHAT, CHAT_BODY, cluster.client())
    first = next(s for s in cluster.prefill if s.received)
    first.mode = "drop"
    client = cluster.client()
    assert await forward(forwarder, CHAT, CHAT_BODY, client)
    assert client.status == 200
    other = next(s for s in cluster.prefill if s is not first)
    assert client.headers["x-cachet-prefill-worker"] == other.url
    rooms = [r.rooms()[0] for s in cluster.prefill for r in s.received]
    assert len(set(rooms)) == len(rooms) == 3  # a new room for the retry
    await asyncio.sleep(0.1)
    assert sum(len(d.cancelled_at) for d in cluster.decode) == 1


async def test_decode_failure_aborts_prefill_and_retries(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=1, decode=2)
    cluster.decode[0].mode = "fail500"
    cluster.decode[1].mode = "fail500"
    client = cluster.client()
    with pytest.raises(GatewayError) as raised:
        await forward(cluster.make(PDSettings(retries=1)), CHAT, CHAT_BODY, client)
    assert raised.value.status == 502
    assert "decode server" in raised.value.message
    assert sorted(len(d.received) for d in cluster.decode) == [1, 1]  # the retry went to the other decode


async def test_a_prefill_4xx_is_passed_through_and_decode_aborted(pd_cluster: Any) -> None:
    cluster = await pd_cluster()
    cluster.prefill[0].mode = "status400"
    client = cluster.client()
    assert await forward(cluster.make(), CHAT, CHAT_BODY, client)
    assert client.status == 400
    assert msgspec.json.decode(client.body)["error"]["message"] == "bad sampling"
    await asyncio.sleep(0.1)
    assert len(cluster.decode[0].cancelled_at) == 1


async def test_prefill_timeout_gives_up_on_the_pair(pd_cluster: Any) -> None:
    cluster = await pd_cluster()
    cluster.prefill[0].mode = "hang"
    began = time.perf_counter()
    with pytest.raises(GatewayError) as raised:
        await forward(
            cluster.make(PDSettings(retries=0, prefill_timeout_s=0.3)), CHAT, CHAT_BODY, cluster.client()
        )
    assert time.perf_counter() - began < 1.5
    assert raised.value.status == 504
    await asyncio.sleep(0.1)
    assert len(cluster.decode[0].cancelled_at) == 1
    assert len(cluster.prefill[0].cancelled_at) == 1


async def test_batch_and_n_get_one_room_per_sequence(pd_cluster: Any) -> None:
    cluster = await pd_cluster()
    forwarder = cluster.make()
    assert await forward(forwarder, GENERATE, {"text": ["a", "b", "c"]}, cluster.client())
    assert await forward(forwarder, CHAT, {**CHAT_BODY, "n": 3}, cluster.client())
    assert await forward(
        forwarder, COMPLETION, {"model": "m", "prompt": ["x", "y"], "n": 2}, cluster.client()
    )
    assert await forward(
        forwarder, GENERATE, {"input_ids": [[1, 2]], "sampling_params": {"n": 2}}, cluster.client()
    )
    received = cluster.prefill[0].received
    sizes = [len(r.body["bootstrap_room"]) for r in received]
    assert sizes == [3, 3, 4, 2]
    for r in received:
        assert r.body["bootstrap_host"] == ["127.0.0.1"] * len(r.body["bootstrap_room"])
        assert r.body["bootstrap_port"] == [9100] * len(r.body["bootstrap_room"])
    everything = [room for r in received for room in r.rooms()]
    assert len(set(everything)) == len(everything)
    for p, d in zip(received, cluster.decode[0].received, strict=True):
        assert p.body["bootstrap_room"] == d.body["bootstrap_room"]


async def test_rooms_are_unique_under_concurrency(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=2, decode=2)
    forwarder = cluster.make()
    clients = [cluster.client() for _ in range(40)]
    bodies = [{**CHAT_BODY, "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(40)]
    results = await asyncio.gather(
        *(forward(forwarder, CHAT, b, c) for b, c in zip(bodies, clients, strict=True))
    )
    assert all(results)
    assert all(c.status == 200 for c in clients)
    rooms = [r.body["bootstrap_room"] for s in cluster.prefill for r in s.received]
    assert len(rooms) == 40 and len(set(rooms)) == 40
    assert forwarder.rooms.in_flight() == 0


async def test_prefill_dp_rank_is_pinned_hinted_and_matches_the_room(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=1, decode=1, prefill_dp=4)
    forwarder = cluster.make()
    for i in range(6):
        client = cluster.client()
        assert await forward(forwarder, GENERATE, {"text": f"prompt {i}"}, client)
        rank = int(client.headers["x-cachet-prefill-dp-rank"])
        p = cluster.prefill[0].received[-1].body
        d = cluster.decode[0].received[-1].body
        assert p["routed_dp_rank"] == rank
        assert d["disagg_prefill_dp_rank"] == rank
        assert p["bootstrap_room"] % 4 == rank
    client = cluster.client()
    assert await forward(forwarder, CHAT, CHAT_BODY, client)
    rank = client.headers["x-cachet-prefill-dp-rank"]
    assert cluster.prefill[0].received[-1].headers["X-Data-Parallel-Rank"] == rank
    assert "X-Data-Parallel-Rank" not in cluster.decode[0].received[-1].headers


async def test_a_listed_request_claims_no_decode_rank_it_did_not_pin(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=1, decode=1, prefill_dp=4, decode_dp=4)
    forwarder = cluster.make()
    single = cluster.client()
    assert await forward(forwarder, GENERATE, {"text": "one prompt"}, single)
    assert int(single.headers["x-cachet-dp-rank"]) == cluster.decode[0].received[-1].body["routed_dp_rank"]
    for body in ({"text": ["a", "b", "c"]}, {"input_ids": [[1, 2], [3]]}):
        client = cluster.client()
        assert await forward(forwarder, GENERATE, body, client)
        sent_to_decode = cluster.decode[0].received[-1].body
        assert "routed_dp_rank" not in sent_to_decode
        assert "x-cachet-dp-rank" not in client.headers
        # Prefill sequences follow their rooms, all congruent to the chosen prefill rank.
        rank = int(client.headers["x-cachet-prefill-dp-rank"])
        assert {room % 4 for room in cluster.prefill[0].received[-1].body["bootstrap_room"]} == {rank}
    decided = [key for key in forwarder.metrics.decisions if key[1] == cluster.decode[0].url]
    assert sorted(key[2] is None for key in decided) == [False, True]


async def test_input_logprobs_of_prefill_are_merged_in_front(pd_cluster: Any) -> None:
    cluster = await pd_cluster()
    forwarder = cluster.make()
    client = cluster.client()
    assert await forward(forwarder, GENERATE, {"text": "hi", "return_logprob": True}, client)
    merged = msgspec.json.decode(client.body)["meta_info"]["input_token_logprobs"]
    assert merged == [[-1.0, 11, None], [-2.0, 12, None], [None, 5, None]]
    client = cluster.client()
    assert await forward(forwarder, GENERATE, {"text": "hi", "return_logprob": True, "stream": True}, client)
    events = [e for e in client.body.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert len(events) == 4
    for event in events:
        assert msgspec.json.decode(event[6:])["meta_info"]["input_token_logprobs"][:2] == [
            [-1.0, 11, None],
            [-2.0, 12, None],
        ]
    # Without logprobs the decode's bytes pass through untouched.
    client = cluster.client()
    assert await forward(forwarder, GENERATE, {"text": "hi"}, client)
    assert "input_token_logprobs" not in msgspec.json.decode(client.body)["meta_info"]


async def test_cached_tokens_reported_through_decode_score_the_prefill_prediction(pd_cluster: Any) -> None:
    # The regular path's prediction-accuracy counters, fed on PD by the prefill router's prediction
    # (the receipt's x-cachet-cached-tokens) against what the decode server reports (the prefill's
    # counts, carried with the KV), whether streamed or not.
    cluster = await pd_cluster()
    forwarder = cluster.make()
    text = "word " * 400
    predicted: list[int] = []
    reported: list[tuple[int, int]] = []
    for stream in (False, True, False):
        client = cluster.client()
        assert await forward(forwarder, GENERATE, {"text": text, "stream": stream}, client)
        assert client.status == 200
        predicted.append(int(client.headers["x-cachet-cached-tokens"]))
        if stream:
            events = [e for e in client.body.split(b"\n\n") if e and e != b"data: [DONE]"]
            meta = msgspec.json.decode(events[-1][len(b"data: ") :])["meta_info"]
        else:
            meta = msgspec.json.decode(client.body)["meta_info"]
        reported.append((meta["prompt_tokens"], meta["cached_tokens"]))
    # The prefill router's prediction, not the decode router's (which ignores prefixes: always 0).
    assert predicted[0] == 0 and any(predicted[1:])
    # A chat answer without usage.prompt_tokens_details reports no cached tokens: not scored.
    assert await forward(forwarder, CHAT, CHAT_BODY, cluster.client())
    stats = forwarder.metrics.model("m")
    assert stats.cache_reports == 3
    assert stats.cached_tokens_reported == sum(cached for _, cached in reported)
    assert stats.cached_tokens_predicted == sum(predicted)
    assert stats.cached_tokens_abs_error == sum(
        abs(p - cached) for p, (_, cached) in zip(predicted, reported, strict=True)
    )
    assert stats.prompt_tokens == sum(prompt for prompt, _ in reported)


async def test_short_uncached_prompts_skip_prefill_when_a_regular_worker_exists(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=1, decode=1, regular=1)
    forwarder = cluster.make(PDSettings(direct_below_tokens=64))
    client = cluster.client()
    assert not await forward(forwarder, CHAT, CHAT_BODY, client)  # about 10 tokens: go direct
    assert not client.messages
    assert not cluster.prefill[0].received and not cluster.decode[0].received
    long_body = {**CHAT_BODY, "messages": [{"role": "user", "content": "word " * 400}]}
    assert await forward(forwarder, CHAT, long_body, cluster.client())
    assert len(cluster.prefill[0].received) == 1


async def test_without_a_regular_worker_short_prompts_are_still_disaggregated(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=1, decode=1, regular=0)
    forwarder = cluster.make(PDSettings(direct_below_tokens=64))
    assert await forward(forwarder, CHAT, CHAT_BODY, cluster.client())
    assert len(cluster.decode[0].received) == 1


async def test_a_pool_without_healthy_servers_fails_fast_or_falls_back(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=1, decode=1, regular=1)
    cluster.registry.unhealthy.add(cluster.decode[0].url)
    began = time.perf_counter()
    with pytest.raises(GatewayError) as raised:
        await forward(cluster.make(), CHAT, CHAT_BODY, cluster.client())
    assert time.perf_counter() - began < 0.5
    assert raised.value.status == 503
    assert "decode" in raised.value.message
    assert ("retry-after", "2") in raised.value.headers
    assert not await forward(
        cluster.make(PDSettings(fallback_to_regular=True)), CHAT, CHAT_BODY, cluster.client()
    )
    assert not cluster.prefill[0].received


async def test_with_fallback_a_pool_that_keeps_failing_hands_the_request_to_regular_workers(
    pd_cluster: Any,
) -> None:
    cluster = await pd_cluster(prefill=1, decode=1, regular=1)
    cluster.prefill[0].mode = "fail500"
    client = cluster.client()
    settings = PDSettings(retries=1, fallback_to_regular=True)
    assert not await forward(cluster.make(settings), CHAT, CHAT_BODY, client)
    assert not client.messages  # nothing sent: the regular path answers
    assert len(cluster.prefill[0].received) == 1  # the only prefill, excluded after its failure


async def test_serves_only_models_with_pd_pools(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=1, decode=1)
    forwarder = cluster.make()
    assert forwarder.serves("m")
    assert not forwarder.serves("other")
    cluster.registry.servers = [s for s in cluster.registry.servers if s.role is Role.REGULAR]
    assert not forwarder.serves("m")


async def test_client_going_away_closes_both_legs(pd_cluster: Any) -> None:
    cluster = await pd_cluster()
    cluster.prefill[0].mode = "hang"
    client = cluster.client()
    task = asyncio.create_task(forward(cluster.make(), CHAT, CHAT_BODY, client))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert len(cluster.prefill[0].cancelled_at) == 1
    assert len(cluster.decode[0].cancelled_at) == 1


async def test_a_long_non_streamed_generation_is_not_cut_by_the_prefill_timeout(pd_cluster: Any) -> None:
    cluster = await pd_cluster()
    cluster.decode[0].answer_delay_s = 0.6
    client = cluster.client()
    assert await forward(cluster.make(PDSettings(prefill_timeout_s=0.3)), CHAT, CHAT_BODY, client)
    assert client.status == 200


async def test_a_stream_without_a_first_byte_after_the_prefill_answered_is_given_up(pd_cluster: Any) -> None:
    cluster = await pd_cluster(prefill=1, decode=1)
    cluster.decode[0].answer_delay_s = 30.0
    settings = PDSettings(retries=0, first_byte_after_prefill_s=0.3)
    began = time.perf_counter()
    with pytest.raises(GatewayError) as raised:
        await forward(cluster.make(settings), CHAT, {**CHAT_BODY, "stream": True}, cluster.client())
    assert time.perf_counter() - began < 1.5
    assert raised.value.status == 504
    assert "decode server" in raised.value.message
    await asyncio.sleep(0.1)
    assert len(cluster.decode[0].cancelled_at) == 1


async def test_replicas_share_pd_state_in_redis_under_their_own_prefixes(
    pd_cluster: Any, redis_server: str
) -> None:
    cluster = await pd_cluster(prefill=2, decode=2)
    body = {**CHAT_BODY, "messages": [{"role": "user", "content": "a long shared question " * 60}]}
    replicas = [
        make_pd_forwarder(cluster.registry, cluster.transport, redis_url=redis_server, seed=i)
        for i in range(2)
    ]
    try:
        for i in range(6):
            client = cluster.client()
            assert await forward(replicas[i % 2], CHAT, body, client)
            assert client.status == 200
        # The same prompt keeps landing on the prefill that cached it, whichever replica routes it.
        assert sorted(len(p.received) for p in cluster.prefill) == [0, 6]
        connection = aioredis.from_url(redis_server)
        keys = [key.decode() for key in await connection.keys("*")]
        await connection.aclose()
        # Redis Cluster hash tags: {prefix:model}:...
        assert any(key.startswith("{cachet:pd-prefill:") for key in keys)
        assert any(key.startswith("{cachet:pd-decode:") for key in keys)
        assert all(key.startswith(("{cachet:pd-prefill:", "{cachet:pd-decode:")) for key in keys)
    finally:
        for replica in replicas:
            await replica.aclose()
