"""Run several routers over the same workload in virtual time and summarise them side by side."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Sequence

import msgspec

from loadtests.replay.cluster import ClusterSpec, ReplayCluster
from loadtests.replay.loop import replay
from loadtests.replay.oracle import OracleCache
from loadtests.replay.report import Summary, summarize
from loadtests.replay.routers import make_router
from loadtests.workloads.request import BenchRequest

__all__ = [
    "DEFAULT_LOAD_BASIS",
    "LOAD_BASES",
    "Capacity",
    "add_load_basis_arg",
    "estimate_capacity",
    "estimate_capacity_rps",
    "run_policies",
]

LOAD_BASES = ("cache-aware", "round-robin")
"""What ``--load`` is a fraction of (see :func:`estimate_capacity`): the workload's saturated burst
throughput with cache-aware routing (``prefix_aware``, never below round robin's: the cluster's
capacity *including* what prefix caching saves) or with ``round_robin`` alone (no cache affinity
beyond chance: nearly the raw prefill/decode capacity)."""

DEFAULT_LOAD_BASIS = "cache-aware"
"""Cache-aware by default: for a prefix-sharing workload round-robin capacity leaves out what caching
saves, so "0.8 load" on that basis is a light load for any cache-aware router and says little about
its queueing; a load relative to what the cluster can actually serve with caching does."""

_BASIS_POLICIES = {"cache-aware": ("prefix_aware", "round_robin"), "round-robin": ("round_robin",)}


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


class Capacity(msgspec.Struct, kw_only=True):
    """A saturated-throughput measurement: every request of the workload at t=0 on empty caches.

    ``policy`` is the routing whose burst set ``rps``; ``measured`` holds every burst run for the
    basis (policy → req/s), ``hit_rate`` and ``makespan_s`` are those of the winning burst.
    """

    basis: str
    policy: str
    rps: float
    requests: int
    makespan_s: float
    hit_rate: float
    measured: dict[str, float]

    def describe(self) -> str:
        runs = ", ".join(f"{p} {r:.2f}" for p, r in self.measured.items())
        return (
            f"{self.rps:.2f} req/s ({self.basis} basis, set by {self.policy}; burst of {self.requests}: "
            f"{runs} req/s; makespan {self.makespan_s:.1f} s, cache hit {self.hit_rate:.1%})"
        )


async def _burst(
    requests: Sequence[BenchRequest], spec: ClusterSpec, policy: str
) -> tuple[float, float, float]:
    """(req/s, makespan, cache hit rate) of the workload at t=0 routed by ``policy``."""
    burst = [msgspec.structs.replace(r, arrival_s=0.0, after=None, think_s=0.0) for r in requests]
    cluster = ReplayCluster(spec)
    records = await replay(burst, cluster, make_router(policy, cluster))
    done = [r for r in records if r.finish_s is not None]
    if not done:
        raise RuntimeError("no request finished while estimating capacity")
    makespan = max(*(r.finish_s for r in done if r.finish_s is not None), 1e-9)
    prompt = sum(r.prompt_tokens for r in done)
    hit = sum(r.cached_tokens for r in done) / prompt if prompt else 0.0
    return len(done) / makespan, makespan, hit


async def estimate_capacity(
    requests: Sequence[BenchRequest], spec: ClusterSpec, *, basis: str = DEFAULT_LOAD_BASIS
) -> Capacity:
    """The engine model's saturated throughput for this workload: requests per second completed
    when every request arrives at once (chat rounds included: a round no longer waits for the
    previous one) on empty caches.

    ``round-robin``: routed by round robin — only the prefix reuse chance puts on one rank.
    ``cache-aware``: the higher of that and the burst routed by ``prefix_aware``. A burst queues
    everything, so on each rank a request is prefilled after the ones ahead of it, whose prefixes
    are then cached: under a cache-aware router the measurement includes the reuse caching gives
    at saturation. It is never taken below round robin's: the cluster can serve at least what
    round robin gets out of it, and a cache-aware router that saturates worse than round robin
    (the Mooncake trace, whose sessions a burst squeezes into one instant) is a routing weakness,
    not a smaller cluster.
    """
    policies = _BASIS_POLICIES.get(basis)
    if policies is None:
        raise ValueError(f"unknown load basis {basis!r}; expected one of {', '.join(LOAD_BASES)}")
    runs = {policy: await _burst(requests, spec, policy) for policy in policies}
    winner = max(runs, key=lambda p: runs[p][0])
    rps, makespan, hit = runs[winner]
    return Capacity(
        basis=basis,
        policy=winner,
        rps=rps,
        requests=len(requests),
        makespan_s=makespan,
        hit_rate=hit,
        measured={policy: run[0] for policy, run in runs.items()},
    )


async def estimate_capacity_rps(
    requests: Sequence[BenchRequest], spec: ClusterSpec, *, basis: str = DEFAULT_LOAD_BASIS
) -> float:
    """:func:`estimate_capacity`'s requests per second."""
    return (await estimate_capacity(requests, spec, basis=basis)).rps


def add_load_basis_arg(parser: argparse.ArgumentParser) -> None:
    """``--load-basis``, shared by the replayer and the HTTP benchmark."""
    parser.add_argument(
        "--load-basis",
        choices=LOAD_BASES,
        default=DEFAULT_LOAD_BASIS,
        help="what --load is a fraction of: this workload's saturated burst throughput routed by "
        "prefix_aware or round_robin, whichever is higher (cache-aware: includes what prefix caching "
        "saves), or by round_robin alone (round-robin: almost no caching; before 2026-11-27 the only "
        f"basis). Default {DEFAULT_LOAD_BASIS}",
    )
