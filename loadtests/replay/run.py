"""Run several routers over the same workload in virtual time and summarise them side by side."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import msgspec

from loadtests.replay.cluster import ClusterSpec, ReplayCluster
from loadtests.replay.loop import replay
from loadtests.replay.oracle import OracleCache
from loadtests.replay.report import Summary, summarize
from loadtests.replay.routers import make_router
from loadtests.workloads.request import BenchRequest

__all__ = ["estimate_capacity_rps", "run_policies"]


async def run_policies(
    make_requests: Callable[[], Iterable[BenchRequest]],
    policies: Sequence[str],
    spec: ClusterSpec,
    *,
    seed: int = 0,
    max_virtual_s: float | None = None,
) -> list[Summary]:
    """One fresh cluster per policy (empty caches), the same requests each time."""
    summaries = []
    for name in policies:
        cluster = ReplayCluster(spec)
        router = make_router(name, cluster, seed=seed)
        started = time.perf_counter()
        records = await replay(
            make_requests(), cluster, router, oracle=OracleCache(), max_virtual_s=max_virtual_s
        )
        wall = time.perf_counter() - started
        summaries.append(
            summarize(router.name, records, targets=[t.label() for t in cluster.targets], wall_s=wall)
        )
    return summaries


async def estimate_capacity_rps(requests: Sequence[BenchRequest], spec: ClusterSpec) -> float:
    """Requests per second the cluster completes when every request arrives at once and round robin
    spreads them (no cache affinity beyond chance): the engine model's saturated throughput."""
    burst = [msgspec.structs.replace(r, arrival_s=0.0, after=None, think_s=0.0) for r in requests]
    cluster = ReplayCluster(spec)
    records = await replay(burst, cluster, make_router("round_robin", cluster))
    finishes = [r.finish_s for r in records if r.finish_s is not None]
    if not finishes:
        raise RuntimeError("no request finished while estimating capacity")
    return len(finishes) / max(*finishes, 1e-9)
