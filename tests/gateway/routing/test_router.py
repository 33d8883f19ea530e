from __future__ import annotations

import asyncio
import gc

import msgspec
import pytest

from gateway.routing import (
    NoHealthyWorker,
    Outcome,
    Router,
    RoutingRequest,
    UnknownModel,
    make_router,
)
from gateway.routing.static import StaticLoad as FakeLoad
from gateway.routing.static import StaticRegistry as FakeRegistry
from gateway.routing.static import StaticWorker
from gateway.state import MemoryStore
from policies import get_policy
from policies.prefix import hash_bytes_blocks
from policies.types import TargetKey

SYSTEM = "You are a meticulous assistant. " * 120  # ~3.8 kB shared system prompt


def chat(question: str, model: str = "m") -> RoutingRequest:
    return RoutingRequest(
        model=model,
        endpoint="chat",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    )


def FakeWorker(url: str, **kw: object) -> StaticWorker:
    return StaticWorker(url, model="m", **kw)  # type: ignore[arg-type]


def two_servers(dp: int = 1) -> FakeRegistry:
    return FakeRegistry([FakeWorker("http://a", dp_size=dp), FakeWorker("http://b", dp_size=dp)])


async def test_round_robin_cycles_over_every_dp_rank() -> None:
    router = make_router("round_robin", two_servers(dp=2), seed=1)
    seen = []
    for i in range(8):
        route = await router.route(chat(f"q{i}"))
        seen.append((route.worker.url, route.dp_rank))
        await router.finish(route, Outcome(ok=True))
    assert seen[:4] == [("http://a", 0), ("http://a", 1), ("http://b", 0), ("http://b", 1)]
    assert seen[4:] == seen[:4]


async def test_dp_rank_is_none_for_single_rank_servers() -> None:
    router = make_router("round_robin", two_servers(dp=1), seed=1)
    route = await router.route(chat("q"))
    assert route.dp_rank is None
    headers = dict(route.receipt_headers)
    assert headers["x-cachet-worker"] == route.worker.url
    assert headers["x-cachet-dp-rank"] == "0"
    assert headers["x-cachet-policy"] == "round_robin"
    assert headers["x-cachet-reason"].startswith("round robin")


async def test_prefix_aware_follows_the_cached_prefix() -> None:
    router = make_router("prefix_aware", two_servers(), seed=7)
    first = await router.route(chat("first question"))
    await router.finish(first, Outcome(ok=True, prompt_tokens=1000, cached_tokens=0))
    second = await router.route(chat("second question"))
    assert second.worker.url == first.worker.url
    assert second.decision.predicted_cached_tokens > 500
    assert "prefix hit" in dict(second.receipt_headers)["x-cachet-reason"]
    assert int(dict(second.receipt_headers)["x-cachet-cached-tokens"]) > 500


async def test_leases_count_in_flight_until_finish() -> None:
    store = MemoryStore()
    router = Router(two_servers(), store, get_policy("least_load"), seed=3)
    routes = [await router.route(chat(f"q{i}")) for i in range(6)]
    loads = store.model("m").loads
    assert sum(load.requests for load in loads.values()) == 6
    # power of two choices over two targets always picks the lighter one: perfect balance
    assert sorted(load.requests for load in loads.values()) == [3, 3]
    for route in routes:
        await router.finish(route, Outcome(ok=True))
        await router.finish(route, Outcome(ok=True))  # a second finish is a no-op
    assert sum(load.requests for load in loads.values()) == 0


async def test_unknown_model_and_no_healthy_worker() -> None:
    registry = two_servers()
    router = make_router("round_robin", registry, seed=1)
    with pytest.raises(UnknownModel):
        await router.route(chat("q", model="nope"))
    for worker in registry.items:
        worker.healthy = False
    with pytest.raises(NoHealthyWorker):
        await router.route(chat("q"))


async def test_exclude_avoids_a_failed_worker() -> None:
    router = make_router("prefix_aware", two_servers(), seed=1)
    for i in range(5):
        route = await router.route(msgspec.structs.replace(chat(f"q{i}"), exclude=frozenset({"http://a"})))
        assert route.worker.url == "http://b"
        await router.finish(route, Outcome(ok=False))
    with pytest.raises(NoHealthyWorker):
        await router.route(msgspec.structs.replace(chat("q"), exclude=frozenset({"http://a", "http://b"})))


async def test_recent_decisions_newest_first_and_bounded() -> None:
    store = MemoryStore()
    router = Router(two_servers(), store, get_policy("round_robin"), seed=1, decisions_kept=3)
    for i in range(5):
        await router.finish(await router.route(chat(f"q{i}")), Outcome(ok=True))
    recent = router.recent_decisions(10)
    assert len(recent) == 3
    assert recent[0]["reason"].startswith("round robin #4")
    assert router.recent_decisions(1)[0] == recent[0]


async def test_reported_load_steers_prefix_aware_away() -> None:
    registry = two_servers()
    registry.loads[TargetKey("http://a")] = FakeLoad(num_waiting_reqs=5, num_waiting_uncached_tokens=50_000)
    router = make_router("prefix_aware", registry, seed=1)
    for i in range(4):
        route = await router.route(chat(f"q{i}"))
        assert route.worker.url == "http://b"
        await router.finish(route, Outcome(ok=True))


async def test_generate_input_ids_and_text_route() -> None:
    router = make_router("prefix_aware", two_servers(), seed=2)
    ids = list(range(1000))
    first = await router.route(RoutingRequest(model="m", endpoint="generate", input_ids=ids))
    await router.finish(first, Outcome(ok=True, prompt_tokens=1000, cached_tokens=0))
    again = await router.route(RoutingRequest(model="m", endpoint="generate", input_ids=[*ids, 5, 6]))
    assert again.worker.url == first.worker.url
    assert again.decision.predicted_cached_tokens == 960  # 15 full blocks of 64 ids
    odd = await router.route(RoutingRequest(model="m", endpoint="generate", input_ids=[[1, 2], [3]]))
    assert odd.decision.predicted_cached_tokens == 0
    text = await router.route(RoutingRequest(model="m", endpoint="generate", text=["a" * 600, "b"]))
    assert text.worker.url in {"http://a", "http://b"}


def prompt(tag: str) -> RoutingRequest:
    return RoutingRequest(model="m", endpoint="generate", text=tag * 2048)


async def test_reported_eviction_forgets_what_the_server_lost() -> None:
    store = MemoryStore()
    registry = FakeRegistry([FakeWorker("http://a")])
    router = Router(registry, store, get_policy("prefix_aware"), seed=1)
    for tag in "xyz":  # x oldest, z newest
        await router.finish(
            await router.route(prompt(tag)), Outcome(ok=True, prompt_tokens=512, cached_tokens=0)
        )
    index = store.model("m").index
    target = TargetKey("http://a")
    again = await router.route(prompt("y"))
    assert again.decision.predicted_cached_tokens >= 500
    # The server had evicted y (so, being LRU, x too); z, newer, survives; y is cached again now.
    await router.finish(again, Outcome(ok=True, prompt_tokens=512, cached_tokens=0))
    x, y, z = (router_blocks(tag) for tag in "xyz")
    assert not any(index.holds(target, h) for h in x)
    assert all(index.holds(target, h) for h in y + z)
    assert index.budget(target) < 100_000 // 64  # capacity estimate shrank


async def test_failed_request_forgets_its_optimistic_blocks() -> None:
    store = MemoryStore()
    router = Router(FakeRegistry([FakeWorker("http://a")]), store, get_policy("prefix_aware"), seed=1)
    route = await router.route(prompt("q"))
    assert store.model("m").index.blocks_on(TargetKey("http://a")) == 8  # 2048 bytes
    await router.finish(route, Outcome(ok=False))
    assert store.model("m").index.blocks_on(TargetKey("http://a")) == 0


async def test_bytes_per_token_learned_from_reported_prompt_tokens() -> None:
    router = make_router("prefix_aware", two_servers(), seed=1)
    route = await router.route(prompt("w"))  # 2048 bytes
    await router.finish(route, Outcome(ok=True, prompt_tokens=1024, cached_tokens=0))
    assert router.bytes_per_token(route.worker.url, "m") == pytest.approx(2.0)
    again = await router.route(prompt("w"))
    assert again.decision.predicted_cached_tokens == 1024  # 8 blocks x 128 tok


def router_blocks(tag: str) -> list[int]:
    return list(hash_bytes_blocks((tag * 2048).encode()).hashes)


class AgedLoad(msgspec.Struct):
    waiting: int
    running: int
    token_usage: float
    age_s: float
    waiting_uncached_tokens: int


async def test_stale_reported_load_is_ignored() -> None:
    registry = two_servers()
    registry.loads[TargetKey("http://a")] = AgedLoad(9, 9, 0.9, 60.0, 90_000)  # type: ignore[assignment]
    registry.loads[TargetKey("http://b")] = AgedLoad(1, 1, 0.1, 0.5, 100)  # type: ignore[assignment]
    router = make_router("prefix_aware", registry, seed=1)
    route = await router.route(chat("q"))
    # a's report is a minute old, so a looks idle; b reports work queued: a wins
    assert route.worker.url == "http://a"


async def test_open_leases_are_renewed_and_abandoned_ones_lapse() -> None:
    store = MemoryStore(lease_ttl_s=0.3)
    router = Router(two_servers(), store, get_policy("round_robin"), seed=1, lease_renew_interval_s=0.05)
    try:
        kept = await router.route(chat("long stream"))
        abandoned = await router.route(chat("forgotten"))
        del abandoned  # dropped without finish(): nothing renews it any more
        gc.collect()
        await asyncio.sleep(0.6)  # no traffic meanwhile: the background loop renews
        await router.route(chat("probe"))  # expires what lapsed
        loads = store.model("m").loads
        assert loads[kept.target].requests == 2  # kept + probe (round robin: a, b, a)
        assert sum(load.requests for load in loads.values()) == 2
    finally:
        await router.aclose()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_hits_stay_until_the_queue_there_outweighs_the_cache() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    router = Router(two_servers(), store, get_policy("prefix_aware"), seed=4, clock=clock)
    shared = "Quarterly report, full text. " * 550  # ~16 kB, ~4000 tokens

    def ask(i: int) -> RoutingRequest:  # the shared part, then ~2,000 tokens of its own
        return RoutingRequest(model="m", endpoint="generate", text=shared + f"Attachment {i:04d}. " * 500)

    routes = [await router.route(ask(i)) for i in range(6)]  # all in flight at once
    home = routes[0].worker.url
    assert routes[1].worker.url == home  # the hit waits for one prefill: still about as fast
    assert "prefix hit" in routes[1].decision.reason
    away = [r for r in routes if r.worker.url != home]
    assert away, "a growing queue on the cached target must send work elsewhere"
    assert "cache miss" in away[0].decision.reason
    # once the queued prompts are prefilled (decoding now), the cache wins again
    clock.now += 10
    later = await router.route(ask(99))
    assert later.decision.predicted_cached_tokens > 3000


async def test_unknown_capacity_still_indexes_prompts() -> None:
    store = MemoryStore()
    registry = FakeRegistry([FakeWorker("http://a", max_total_num_tokens=0)])
    router = Router(registry, store, get_policy("prefix_aware"), seed=1)
    await router.finish(await router.route(prompt("u")), Outcome(ok=True))
    again = await router.route(prompt("u"))
    assert again.decision.predicted_cached_tokens >= 500


async def test_a_miss_behind_an_unfinished_prefill_is_not_taken_for_eviction() -> None:
    store = MemoryStore()
    router = Router(FakeRegistry([FakeWorker("http://a")]), store, get_policy("prefix_aware"), seed=1)
    await router.finish(await router.route(prompt("o")), Outcome(ok=True, prompt_tokens=512, cached_tokens=0))
    first = await router.route(prompt("p"))
    second = await router.route(prompt("p"))  # same prompt while the first is still in flight
    assert second.decision.predicted_cached_tokens >= 500
    # SGLang batched both before the first's KV was cached: the second reports no hit
    await router.finish(second, Outcome(ok=True, prompt_tokens=512, cached_tokens=0))
    await router.finish(first, Outcome(ok=True, prompt_tokens=512, cached_tokens=0))
    target = TargetKey("http://a")
    index = store.model("m").index
    assert all(index.holds(target, h) for h in router_blocks("o"))  # nothing was evicted
    assert index.budget(target) == 100_000 // 64  # nor did the capacity estimate shrink (4 B/token)


async def test_a_near_miss_within_estimate_error_is_not_eviction() -> None:
    store = MemoryStore()
    router = Router(FakeRegistry([FakeWorker("http://a")]), store, get_policy("prefix_aware"), seed=1)
    long_text = RoutingRequest(model="m", endpoint="generate", text="k" * 64_000)  # 250 blocks
    await router.finish(
        await router.route(long_text), Outcome(ok=True, prompt_tokens=16_000, cached_tokens=0)
    )
    again = await router.route(long_text)
    predicted = again.decision.predicted_cached_tokens
    # 4 % fewer than predicted: the bytes-per-token estimate, not an eviction
    await router.finish(again, Outcome(ok=True, prompt_tokens=16_000, cached_tokens=int(predicted * 0.96)))
    assert store.model("m").index.blocks_on(TargetKey("http://a")) == 250


async def test_every_worker_budget_follows_the_learned_bytes_per_token() -> None:
    store = MemoryStore()
    router = Router(two_servers(), store, get_policy("round_robin"), seed=1)
    for _ in range(2):  # one request on each worker, both at 8 bytes per token
        await router.finish(
            await router.route(prompt("b")), Outcome(ok=True, prompt_tokens=256, cached_tokens=0)
        )
    index = store.model("m").index
    # 100,000 tokens at 8 B/token in 256-byte blocks (32 tokens per block)
    assert index.budget(TargetKey("http://a")) == index.budget(TargetKey("http://b")) == 3125


async def test_status_reports_store_and_learning() -> None:
    router = make_router("prefix_aware", two_servers(), seed=1)
    route = await router.route(prompt("s"))
    status = router.status()
    assert status["policy"] == "prefix_aware" and status["open_routes"] == 1
    assert status["store"]["store"] == "memory" and status["routed"] == {"m": 1}
    await router.finish(route, Outcome(ok=True, prompt_tokens=1024, cached_tokens=0))
    assert router.status()["bytes_per_token"]["model:m"] == 2.0
    assert router.status()["open_routes"] == 0


async def test_a_refused_request_is_no_evidence_of_eviction() -> None:
    # The Mooncake replay: a prompt over the context length comes back with no token and 0 cached.
    store = MemoryStore()
    router = Router(FakeRegistry([FakeWorker("http://a")]), store, get_policy("prefix_aware"), seed=1)
    for tag in "stu":
        await router.finish(
            await router.route(prompt(tag)), Outcome(ok=True, prompt_tokens=512, cached_tokens=0)
        )
    huge = RoutingRequest(model="m", endpoint="generate", text="s" * 2048 + "v" * 64_000)
    refused = await router.route(huge)
    assert refused.decision.predicted_cached_tokens >= 500  # shares s's blocks
    await router.finish(
        refused, Outcome(ok=True, prompt_tokens=16_512, cached_tokens=0, completion_tokens=0, ttft_s=None)
    )
    target = TargetKey("http://a")
    index = store.model("m").index
    # Nothing older was evicted, the capacity estimate did not shrink, and the blocks the server
    # never cached are forgotten (only s's 8 shared ones remain of the huge prompt).
    assert all(index.holds(target, h) for tag in "stu" for h in router_blocks(tag))
    assert index.budget(target) == 100_000 // 64
    assert index.blocks_on(target) == 24
    # A session's next turn after it is still predicted where its history is.
    assert (await router.route(prompt("t"))).decision.predicted_cached_tokens >= 500


async def test_a_generate_batch_on_a_multi_rank_server_is_not_pinned_or_indexed_on_a_rank() -> None:
    router = make_router("prefix_aware", two_servers(dp=4), seed=3)
    batch = RoutingRequest(model="m", endpoint="generate", text=[SYSTEM + "one", SYSTEM + "two"])
    route = await router.route(batch)
    # The server spreads the items over its ranks itself: no rank is pinned or claimed.
    assert route.dp_rank is None
    assert "x-cachet-dp-rank" not in dict(route.receipt_headers)
    assert router.recent_decisions(1)[0]["dp_rank"] is None
    await router.finish(route, Outcome(ok=True, prompt_tokens=2000, cached_tokens=0))
    # Nor is the prefix indexed on a rank that may never have seen it.
    single = await router.route(RoutingRequest(model="m", endpoint="generate", text=SYSTEM + "three"))
    assert single.decision.predicted_cached_tokens == 0
    assert single.dp_rank is not None


async def test_a_prompt_list_on_v1_completions_is_pinned_by_header_like_a_single_prompt() -> None:
    router = make_router("round_robin", two_servers(dp=4), seed=3)
    route = await router.route(RoutingRequest(model="m", endpoint="completion", prompt=["a", "b"]))
    assert route.dp_rank is not None
    assert dict(route.receipt_headers)["x-cachet-dp-rank"] == str(route.dp_rank)


async def test_new_load_reports_are_read_per_target_not_by_rebuilding_every_view() -> None:
    registry = FakeRegistry([FakeWorker(f"http://s{i}", dp_size=4) for i in range(8)])
    now = [0.0]
    router = Router(registry, MemoryStore(), get_policy("prefix_aware"), seed=1, clock=lambda: now[0])
    viewed: list[TargetKey] = []
    original = router._view

    def counting_view(worker: StaticWorker, key: TargetKey, state: object) -> object:
        viewed.append(key)
        return original(worker, key, state)  # type: ignore[arg-type]

    router._view = counting_view  # type: ignore[assignment,method-assign]
    await router.finish(await router.route(chat("warm")), Outcome(ok=True))
    assert len(viewed) == 32  # the first table: every target
    viewed.clear()
    busy = TargetKey("http://s3", 2)
    registry.loads[busy] = FakeLoad(num_waiting_reqs=9, num_waiting_uncached_tokens=900_000)
    now[0] += 1.0  # past the reported-load interval
    await router.finish(await router.route(chat("next")), Outcome(ok=True))
    assert viewed == [busy]  # only the target whose report changed
    view = router._tables["m"].base[router._tables["m"].position[busy]]
    assert view.reported_waiting_tokens == 900_000
    viewed.clear()
    now[0] += 11.0  # past reported_max_age_s: a full rebuild drops reports gone stale
    await router.finish(await router.route(chat("later")), Outcome(ok=True))
    assert len(viewed) == 32
    await router.aclose()


async def test_a_prefill_on_one_dp_rank_weighs_on_its_sibling_ranks() -> None:
    # Under DP attention a server's ranks run the MoE layers in lock-step: a long prefill queued on
    # a:0 slows a:1 too, so a cache miss goes to server b, not to a's idle-looking rank.
    for seed in range(20):
        registry = two_servers(dp=2)
        long_queue = FakeLoad(num_waiting_reqs=1, num_waiting_uncached_tokens=30_000)
        registry.loads[TargetKey("http://a", 0)] = long_queue
        router = make_router("prefix_aware", registry, seed=seed)
        route = await router.route(RoutingRequest(model="m", endpoint="generate", text=f"{seed} " * 3000))
        assert route.worker.url == "http://b", route.decision.reason
        views = {view.key: view for view in router._tables["m"].base}
        assert views[TargetKey("http://a", 1)].sibling_prefill_tokens == 30_000
        assert views[TargetKey("http://a", 0)].sibling_prefill_tokens == 0
        await router.finish(route, Outcome(ok=True))
        await router.aclose()
