"""Trace replay in virtual time: the gateway's routing code and the simulator's engine model, no
sockets. ``python -m loadtests.replay --help``."""

from loadtests.replay.cluster import ClusterSpec, ReplayCluster, Speeds, measure_speeds
from loadtests.replay.loop import RequestRecord, RequestTokens, oracle_hits, replay
from loadtests.replay.oracle import OracleCache
from loadtests.replay.report import Summary, markdown_table, summarize
from loadtests.replay.routers import GatewayRouting, ReplayRouter, SglangReimplRouting, make_router
from loadtests.replay.run import (
    DEFAULT_LOAD_BASIS,
    LOAD_BASES,
    Capacity,
    estimate_capacity,
    estimate_capacity_rps,
    run_policies,
)
from loadtests.replay.sglang_cache_aware import CacheAwareConfig, CharRadixTree, SglangCacheAware

__all__ = [
    "DEFAULT_LOAD_BASIS",
    "LOAD_BASES",
    "CacheAwareConfig",
    "Capacity",
    "CharRadixTree",
    "ClusterSpec",
    "GatewayRouting",
    "OracleCache",
    "ReplayCluster",
    "ReplayRouter",
    "RequestRecord",
    "RequestTokens",
    "SglangCacheAware",
    "SglangReimplRouting",
    "Speeds",
    "Summary",
    "estimate_capacity",
    "estimate_capacity_rps",
    "make_router",
    "markdown_table",
    "measure_speeds",
    "oracle_hits",
    "replay",
    "run_policies",
    "summarize",
]
