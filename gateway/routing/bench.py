"""Decision-cost benchmark for the Router: how long routing one request takes on a large cluster.

    python -m gateway.routing.bench [--servers 128 --dp-size 8] [--blocks 1000000] [--requests 20000]
                                    [--policy prefix_aware] [--redis-url redis://127.0.0.1:PORT/0]

Builds a static cluster (servers × DP ranks targets), fills the prefix index to ``--blocks``
(block, target) entries from real prompts (shared system prompts of 1-16 kB, each held by a few
dozen targets, plus per-request suffixes), then routes ``--requests`` chat requests drawn from the
same prompt families and reports percentiles of:

- hash: canonicalising and block-hashing the prompt;
- decide: the policy's decide() alone;
- route: all of Router.route() (hash, prefix match, snapshot, decide, reserve, receipt);
- reserve: the store's reserve (check-and-add the lease, record the prompt's blocks on the target);
- route_minus_hash: route's CPU time less the hashing CPU time measured on the same request;
- decision: route less hashing less reserve: prefix match, snapshot, policy, receipt;
- finish: Router.finish() (release and index correction).

Each as this thread's CPU time and as wall time (see _Timer).

With the embedded store nothing awaits, so the times are CPU cost. With ``--redis-url`` the store
is the Redis one and route/finish include one Redis round trip each.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import time
from typing import Any

import msgspec

from gateway.routing import Outcome, Router, RoutingRequest
from gateway.routing._features import prompt_blocks
from gateway.routing.static import StaticRegistry, StaticWorker
from gateway.state import MemoryStore, StateStore
from gateway.state.redis_store import RedisStore
from policies import get_policy
from policies.prefix import DEFAULT_BLOCK_BYTES, DEFAULT_BLOCK_IDS
from policies.types import Decision, Policy, RequestFeatures, Snapshot, TargetKey

_WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega tensor kernel".split(" ")  # noqa: SIM905


def _text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)[:size]


class _Timer:
    """Wall time and this thread's CPU time of a section. On a shared machine the wall time of a
    few percent of samples includes being descheduled; CPU time is the cost of the code itself."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._wall = 0.0
        self._cpu = 0

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.thread_time_ns()

    def stop(self) -> None:
        self.cpu.append((time.thread_time_ns() - self._cpu) / 1e9)
        self.wall.append(time.perf_counter() - self._wall)

    def report(self) -> dict[str, dict[str, float]]:
        return {"cpu": _percentiles(self.cpu), "wall": _percentiles(self.wall)}


class _TimedPolicy:
    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.timer = _Timer()

    def decide(self, features: RequestFeatures, snapshot: Snapshot, rng: random.Random) -> Decision:
        self.timer.start()
        decision = self.inner.decide(features, snapshot, rng)
        self.timer.stop()
        return decision


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "p50_us": ordered[n // 2] * 1e6,
        "p90_us": ordered[int(n * 0.9)] * 1e6,
        "p99_us": ordered[min(int(n * 0.99), n - 1)] * 1e6,
        "max_us": ordered[-1] * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    targets_n = args.servers * args.dp_size
    per_target_blocks = max(args.blocks // targets_n, 1)
    tokens_per_block = DEFAULT_BLOCK_BYTES // 4
    workers = [
        StaticWorker(
            f"http://10.0.{i // 250}.{i % 250}:30000",
            dp_size=args.dp_size,
            max_total_num_tokens=per_target_blocks * tokens_per_block,
            # two hardware generations, so the cost model compares unequal speeds
            prefill_tokens_per_s=12_000.0 if i % 2 else 4_500.0,
            decode_step_s=0.02 if i % 2 else 0.05,
        )
        for i in range(args.servers)
    ]
    registry = StaticRegistry(workers)
    store: StateStore = (
        RedisStore(args.redis_url, op_timeout_s=1.0) if args.redis_url else MemoryStore(lease_ttl_s=3600)
    )
    policy = _TimedPolicy(get_policy(args.policy))
    reserving = _Timer()
    reserve = store.reserve

    async def timed_reserve(*a: Any, **k: Any) -> Any:
        reserving.start()
        try:
            return await reserve(*a, **k)
        finally:
            reserving.stop()

    store.reserve = timed_reserve  # type: ignore[method-assign]
    router: Router[StaticWorker] = Router(registry, store, policy, seed=args.seed)
    await router.start()

    families = [_text(rng, rng.randint(1024, 16 * 1024)) for _ in range(args.families)]

    def request() -> RoutingRequest:
        family = families[min(int(rng.paretovariate(1.2)) - 1, len(families) - 1)]
        return RoutingRequest(
            model="default",
            endpoint="chat",
            messages=[
                {"role": "system", "content": family},
                {"role": "user", "content": _text(rng, rng.randint(200, 2000))},
            ],
        )

    # Fill the index directly (as if long traffic had run), then warm the Router's tables.
    state = await store.ready("default")
    index = state.index
    keys = [TargetKey(w.url, r) for w in workers for r in range(w.dp_size)]
    filled_started = time.perf_counter()
    while len(index) < args.blocks:
        target = rng.choice(keys)
        blocks, _ = prompt_blocks(request(), block_bytes=DEFAULT_BLOCK_BYTES, block_ids=DEFAULT_BLOCK_IDS)
        index.record(target, blocks.hashes)
    fill_s = time.perf_counter() - filled_started
    await router.finish(await router.route(request()), Outcome(ok=True))

    hashing, routing, finishing = _Timer(), _Timer(), _Timer()
    hits = 0
    policy.timer = _Timer()
    reserving.cpu.clear()
    reserving.wall.clear()
    reqs = [request() for _ in range(args.requests)]
    gc.collect()
    gc.freeze()
    inflight: list[Any] = []
    for req in reqs:
        hashing.start()
        prompt_blocks(req, block_bytes=DEFAULT_BLOCK_BYTES, block_ids=DEFAULT_BLOCK_IDS)
        hashing.stop()
        routing.start()
        route = await router.route(req)
        routing.stop()
        hits += route.decision.predicted_cached_tokens > 0
        inflight.append(route)
        if len(inflight) >= args.concurrency:  # keep ``concurrency`` requests in flight
            done = inflight.pop(rng.randrange(len(inflight)))
            cached = done.decision.predicted_cached_tokens
            finishing.start()
            await router.finish(done, Outcome(ok=True, prompt_tokens=None, cached_tokens=cached))
            finishing.stop()
    for done in inflight:
        await router.finish(done, Outcome(ok=True))
    gc.unfreeze()
    await router.aclose()
    return {
        "targets": targets_n,
        "indexed_entries": len(index),
        "distinct_blocks_sampled_prompt_families": args.families,
        "fill_s": round(fill_s, 1),
        "requests": args.requests,
        "prefix_hits": hits,
        "store": store.name,
        "policy": args.policy,
        "hash": hashing.report(),
        "decide": policy.timer.report(),
        "route": routing.report(),
        "reserve": reserving.report(),
        "route_minus_hash_cpu": _percentiles([r - h for r, h in zip(routing.cpu, hashing.cpu, strict=True)]),
        "decision_cpu": _percentiles(
            [r - h - v for r, h, v in zip(routing.cpu, hashing.cpu, reserving.cpu, strict=True)]
        ),
        "finish": finishing.report(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.routing.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--servers", type=int, default=128)
    parser.add_argument("--dp-size", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--families", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--policy", default="prefix_aware")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--seed", type=int, default=0)
    result = asyncio.run(run(parser.parse_args(argv)))
    print(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())


if __name__ == "__main__":
    main()
