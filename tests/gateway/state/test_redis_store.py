from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.state import Choice
from gateway.state.redis_store import RedisStore, model_keys
from policies.types import TargetKey

X, Y = TargetKey("http://x", 0), TargetKey("http://x", 1)
TARGETS = [TargetKey(f"http://w{i}") for i in range(10)]


@pytest.fixture
async def replicas(redis_process: Any) -> AsyncIterator[Callable[..., Any]]:
    made: list[RedisStore] = []

    async def make(**kw: Any) -> RedisStore:
        options: dict[str, Any] = {"op_timeout_s": 0.2, "retry_interval_s": 0.1, "loads_sync_interval_s": 0.0}
        options.update(kw)
        store = RedisStore(redis_process.url, **options)
        await store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


def test_keys_share_one_cluster_hash_tag() -> None:
    keys = model_keys("deepseek-ai/DeepSeek-V3")
    assert all(key.startswith("{cachet:deepseek-ai/DeepSeek-V3}:") for key in keys)
    assert len(set(keys)) == 5


async def test_leases_and_loads_are_shared(replicas: Callable[..., Any]) -> None:
    one, two = await replicas(), await replicas()
    lease = await one.reserve("m", [Choice(X, 0)], prefill_tokens=700, blocks=[1, 2, 3])
    assert lease.target == X and not lease.local_only
    # the other replica learns both the load and the index on its next call
    other = await two.reserve("m", [Choice(Y, 5)], prefill_tokens=10, blocks=[])
    loads = two.model("m").loads
    assert (loads[X].requests, loads[X].prefill_tokens) == (1, 700)
    assert [(m.target, m.blocks) for m in two.model("m").index.match([1, 2, 3])] == [(X, 3)]
    await one.release(lease)
    await two.release(other)
    assert (loads[X].requests, loads[X].prefill_tokens) == (0, 0)
    assert loads[Y].requests == 0


async def test_reserve_is_atomic_across_replicas(replicas: Callable[..., Any]) -> None:
    one, two = await replicas(), await replicas()
    choices = [Choice(t, 0) for t in TARGETS]
    # Both replicas think every target is idle and all ten requests prefer w0 first.
    leases = await asyncio.gather(
        *(store.reserve("m", choices, prefill_tokens=1, blocks=[]) for store in (one, two) for _ in range(5))
    )
    assert sorted(lease.target.worker for lease in leases) == sorted(t.worker for t in TARGETS)
    assert sum(one.counters["first_choice_taken"] for one in (one, two)) == 9
    # a freed target is found behind two busy ones
    freed = leases[3].target
    await one.release(leases[3])
    late = await two.reserve("m", [*choices[:2], Choice(freed, 0)], prefill_tokens=1, blocks=[])
    assert late.target == freed and late.choice == 2
    # every choice busier than the policy saw: the least loaded of them
    await one.reserve("m", [Choice(TARGETS[0], 9)], prefill_tokens=1, blocks=[])  # w0 now has 2
    crowded = await one.reserve("m", [Choice(TARGETS[0], 0), Choice(freed, 0)], prefill_tokens=1, blocks=[])
    assert crowded.target == freed and crowded.choice == 1


async def test_index_updates_and_corrections_propagate(replicas: Callable[..., Any]) -> None:
    one, two = await replicas(), await replicas()
    lease = await one.reserve("m", [Choice(X, 9)], prefill_tokens=1, blocks=[10, 11, 12, 13])
    await one.release(lease, forget=[12, 13])
    sync = await two.reserve("m", [Choice(Y, 9)], prefill_tokens=1, blocks=[])
    assert [(m.target, m.blocks) for m in two.model("m").index.match([10, 11, 12, 13])] == [(X, 2)]
    await two.release(sync)
    # a replica starting later rebuilds the index from the stream's history
    late = await replicas()
    await late.release(await late.reserve("m", [Choice(Y, 9)], prefill_tokens=1, blocks=[]))
    assert [(m.target, m.blocks) for m in late.model("m").index.match([10, 11, 12, 13])] == [(X, 2)]


async def test_lapsed_leases_stop_counting(replicas: Callable[..., Any]) -> None:
    crashed = await replicas(lease_ttl_s=0.3)
    survivor = await replicas(lease_ttl_s=0.3)
    await crashed.reserve("m", [Choice(X, 9)], prefill_tokens=50, blocks=[])
    kept = await survivor.reserve("m", [Choice(Y, 9)], prefill_tokens=5, blocks=[])
    for _ in range(3):
        await asyncio.sleep(0.15)
        await survivor.renew([kept])
    probe = await survivor.reserve("m", [Choice(Y, 9)], prefill_tokens=0, blocks=[])
    loads = survivor.model("m").loads
    assert loads[X].requests == 0  # the crashed replica's lease lapsed
    assert loads[Y].requests == 2  # the renewed one did not
    await survivor.release(probe)
    await survivor.release(kept)


async def test_unreachable_redis_at_start_routes_locally(tmp_path: Any) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", op_timeout_s=0.05, retry_interval_s=10)
    await store.start()
    try:
        assert not store.connected
        lease = await store.reserve("m", [Choice(X, 0), Choice(Y, 0)], prefill_tokens=3, blocks=[1])
        assert lease.local_only and lease.target == X
        second = await store.reserve("m", [Choice(X, 0), Choice(Y, 0)], prefill_tokens=3, blocks=[])
        assert second.target == Y  # the local bound still spreads
        await store.release(lease)
        await store.release(second)
        assert store.model("m").loads[X].requests == 0
    finally:
        await store.aclose()


async def test_slow_redis_falls_back_then_resyncs(redis_process: Any, replicas: Callable[..., Any]) -> None:
    one = await replicas(op_timeout_s=0.1, retry_interval_s=0.2)
    two = await replicas()
    shared = await one.reserve("m", [Choice(X, 9)], prefill_tokens=1, blocks=[])
    await two.release(await two.reserve("m", [Choice(Y, 9)], prefill_tokens=0, blocks=[]))
    assert two.model("m").loads[X].requests == 1
    redis_process.pause()
    try:
        started = time.monotonic()
        local = await one.reserve("m", [Choice(Y, 9)], prefill_tokens=1, blocks=[7, 8])
        await one.release(shared)  # cannot reach Redis: queued
        elapsed = time.monotonic() - started
        assert local.local_only and not one.connected
        assert elapsed < 0.5  # one timeout, then no more waiting on Redis
        assert one.model("m").loads[X].requests == 0
    finally:
        redis_process.resume()
    await asyncio.sleep(0.25)
    await one.release(local)  # triggers the resync in the background
    for _ in range(50):
        if one.connected:
            break
        await asyncio.sleep(0.05)
    assert one.connected and one.counters["resyncs"] >= 1
    # the other replica sees the queued release and the blocks recorded while Redis was away
    sync = await two.reserve("m", [Choice(Y, 9)], prefill_tokens=0, blocks=[])
    loads = two.model("m").loads
    assert loads[X].requests == 0
    assert two.model("m").index.match([7, 8])[0].target == Y
    await two.release(sync)


async def test_redis_restart_resyncs_without_errors(redis_process: Any, replicas: Callable[..., Any]) -> None:
    store = await replicas(op_timeout_s=0.1, retry_interval_s=0.1)
    await store.release(await store.reserve("m", [Choice(X, 9)], prefill_tokens=1, blocks=[]))
    redis_process.stop()
    for i in range(5):
        lease = await store.reserve("m", [Choice(X, 9)], prefill_tokens=1, blocks=[100 + i])
        await store.release(lease)
    assert not store.connected
    redis_process.start()
    await asyncio.sleep(0.15)
    await store.release(await store.reserve("m", [Choice(X, 9)], prefill_tokens=1, blocks=[]))
    for _ in range(50):
        if store.connected:
            break
        await asyncio.sleep(0.05)
    assert store.connected
    lease = await store.reserve("m", [Choice(X, 9)], prefill_tokens=1, blocks=[])
    assert not lease.local_only
    await store.release(lease)


async def test_prefill_tokens_stop_counting_when_due(replicas: Callable[..., Any]) -> None:
    one, two = await replicas(), await replicas()
    lease = await one.reserve("m", [Choice(X, 9)], prefill_tokens=4000, blocks=[], prefill_s=0.2)
    other = await two.reserve("m", [Choice(X, 9)], prefill_tokens=100, blocks=[])
    assert (two.model("m").loads[X].requests, two.model("m").loads[X].prefill_tokens) == (2, 4100)
    await asyncio.sleep(0.3)
    await two.release(other)
    assert (two.model("m").loads[X].requests, two.model("m").loads[X].prefill_tokens) == (1, 0)
    await one.release(lease)
    assert (one.model("m").loads[X].requests, one.model("m").loads[X].prefill_tokens) == (0, 0)


async def _until(condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def test_a_routing_replica_pulls_others_updates_without_a_call_of_its_own(
    replicas: Callable[..., Any],
) -> None:
    placer = await replicas()
    reader = await replicas(sync_interval_s=0.02)
    await reader.release(await reader.reserve("m", [Choice(Y, 9)], prefill_tokens=1, blocks=[]))
    calls = reader.counters["calls"]
    lease = await placer.reserve("m", [Choice(X, 9)], prefill_tokens=700, blocks=[1, 2, 3])
    # No request reaches the reader, yet its mirror learns the placement and the load: the next
    # request it routes for this prefix decides on it.
    assert await _until(lambda: bool(reader.model("m").index.match([1, 2, 3])))
    assert [(m.target, m.blocks) for m in reader.model("m").index.match([1, 2, 3])] == [(X, 3)]
    assert await _until(lambda: X in reader.model("m").loads and reader.model("m").loads[X].requests == 1)
    assert reader.counters["background_syncs"] >= 1 and reader.counters["calls"] > calls
    await placer.release(lease)


async def test_an_idle_replica_pulls_only_at_the_idle_interval(replicas: Callable[..., Any]) -> None:
    idle = await replicas(sync_interval_s=0.01, sync_idle_after_s=0.1, sync_idle_interval_s=0.5)
    await idle.release(await idle.reserve("m", [Choice(Y, 9)], prefill_tokens=1, blocks=[]))
    assert await _until(lambda: idle.counters["background_syncs"] >= 1)
    await asyncio.sleep(0.15)  # past sync_idle_after_s
    calls = idle.counters["calls"]
    await asyncio.sleep(1.1)
    # Routing, it would have pulled about a hundred times; idle, two or three.
    assert 1 <= idle.counters["calls"] - calls <= 3
