"""Who picks the target in a replay: the gateway's own Router (production code: features, prefix
index, leases, policy, index correction) on a virtual clock, or the re-implemented sglang-router
cache_aware policy."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from gateway.routing import Outcome, Router, RoutingRequest
from gateway.routing.static import StaticLoad, StaticRegistry
from gateway.state import MemoryStore
from loadtests.replay.cluster import MODEL, ReplayCluster
from loadtests.replay.sglang_cache_aware import CacheAwareConfig, SglangCacheAware
from loadtests.workloads.request import BenchRequest, prompt_text
from policies import get_policy
from policies.types import TargetKey

__all__ = ["Finished", "GatewayRouting", "ReplayRouter", "Replicas", "SglangReimplRouting", "make_router"]


class Finished:
    """What the server said about a finished request (what the gateway reads from the response)."""

    __slots__ = ("cached_tokens", "completion_tokens", "e2e_s", "prompt_tokens", "ttft_s")

    def __init__(
        self,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        e2e_s: float,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.completion_tokens = completion_tokens
        self.ttft_s = ttft_s
        self.e2e_s = e2e_s


class ReplayRouter(Protocol):
    name: str

    async def route(self, request: BenchRequest, now: float) -> tuple[TargetKey, Any]: ...

    async def finish(self, handle: Any, finished: Finished, now: float) -> None: ...


class _VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class GatewayRouting:
    """The gateway's Router with the embedded store, over a static registry whose reported loads
    are the engines' own, refreshed every ``load_interval_s`` of virtual time (as the registry polls)."""

    def __init__(
        self,
        policy: str,
        cluster: ReplayCluster,
        *,
        seed: int = 0,
        load_interval_s: float = 1.0,
        shared: tuple[MemoryStore, _VirtualClock] | None = None,
    ) -> None:
        self.name = policy
        self._cluster = cluster
        if shared is None:
            self._clock = _VirtualClock()
            store = MemoryStore(clock=self._clock)
        else:
            store, self._clock = shared
        self._registry = StaticRegistry(list(cluster.workers))
        self._load_interval_s = load_interval_s
        self._loads_at = -math.inf
        self._router: Router[Any] = Router(
            self._registry,
            store,
            get_policy(policy),
            seed=seed,
            clock=self._clock,
            # Leases are released exactly at finish in a replay; renewal would need wall-clock tasks.
            lease_renew_interval_s=math.inf,
        )

    def _poll_loads(self, now: float) -> None:
        if now - self._loads_at < self._load_interval_s:
            return
        self._loads_at = now
        loads = self._registry.loads
        for key, rank in self._cluster.ranks.items():
            load = rank.load()
            loads[key] = StaticLoad(
                num_running_reqs=load.num_running_reqs,
                num_waiting_reqs=load.num_waiting_reqs,
                num_waiting_uncached_tokens=load.num_waiting_uncached_tokens,
                token_usage=load.token_usage,
            )

    async def route(self, request: BenchRequest, now: float) -> tuple[TargetKey, Any]:
        self._clock.now = now
        self._poll_loads(now)
        if request.messages is not None:
            routing = RoutingRequest(
                model=MODEL,
                endpoint="chat",
                messages=list(request.messages),
                max_new_tokens=request.max_tokens,
                stream=True,
            )
        else:
            routing = RoutingRequest(
                model=MODEL,
                endpoint="completion",
                prompt=request.prompt,
                max_new_tokens=request.max_tokens,
                stream=True,
            )
        route = await self._router.route(routing)
        return route.target, route

    async def finish(self, handle: Any, finished: Finished, now: float) -> None:
        self._clock.now = now
        await self._router.finish(
            handle,
            Outcome(
                ok=True,
                prompt_tokens=finished.prompt_tokens,
                cached_tokens=finished.cached_tokens,
                completion_tokens=finished.completion_tokens,
                ttft_s=finished.ttft_s,
                e2e_s=finished.e2e_s,
            ),
        )


class SglangReimplRouting:
    """sglang-router's cache_aware with --dp-aware (every ``url@rank`` a worker), re-implemented."""

    def __init__(self, cluster: ReplayCluster, config: CacheAwareConfig | None = None) -> None:
        self._by_label = {key.label(): key for key in cluster.targets}
        self.policy = SglangCacheAware(list(self._by_label), config)
        self.name = self.policy.name

    async def route(self, request: BenchRequest, now: float) -> tuple[TargetKey, Any]:
        label = self.policy.select(prompt_text(request), now)
        return self._by_label[label], label

    async def finish(self, handle: Any, finished: Finished, now: float) -> None:
        self.policy.complete(handle)


class Replicas:
    """Several router replicas in front of one cluster; requests are spread over them in turn (as a
    client load balancer would). Each replica finishes the requests it routed."""

    def __init__(self, name: str, replicas: list[ReplayRouter]) -> None:
        self.name = name
        self._replicas = replicas
        self._turn = 0

    async def route(self, request: BenchRequest, now: float) -> tuple[TargetKey, Any]:
        index = self._turn % len(self._replicas)
        self._turn += 1
        target, handle = await self._replicas[index].route(request, now)
        return target, (index, handle)

    async def finish(self, handle: Any, finished: Finished, now: float) -> None:
        index, inner = handle
        await self._replicas[index].finish(inner, finished, now)


_REPLICAS = 3


def make_router(name: str, cluster: ReplayCluster, *, seed: int = 0) -> ReplayRouter:
    """``sglang_cache_aware`` is the re-implementation; any other name is a Cachet policy.

    ``x3:<name>`` is three independent replicas (each its own state, as sglang-router 0.3.x
    replicas are); ``shared3:<policy>`` is three Cachet routers sharing one state store (what Redis
    gives gateway replicas, without its network round trips).
    """
    if name.startswith("x3:"):
        inner = name.removeprefix("x3:")
        replicas = [make_router(inner, cluster, seed=seed + i) for i in range(_REPLICAS)]
        return Replicas(f"x3:{replicas[0].name}", replicas)
    if name.startswith("shared3:"):
        policy = name.removeprefix("shared3:")
        clock = _VirtualClock()
        shared = (MemoryStore(clock=clock), clock)
        gateways: list[ReplayRouter] = [
            GatewayRouting(policy, cluster, seed=seed + i, shared=shared) for i in range(_REPLICAS)
        ]
        return Replicas(f"shared3:{policy}", gateways)
    if name in ("sglang_cache_aware", "sglang_cache_aware(reimpl)"):
        return SglangReimplRouting(cluster)
    return GatewayRouting(name, cluster, seed=seed)


RouterFactory = Callable[[ReplayCluster], ReplayRouter]
