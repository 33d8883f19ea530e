"""The registry against the SGLang simulator: every server age, DP ranks and PD roles."""

from __future__ import annotations

import asyncio

import pytest

from backends.sim import ClusterSpec, SimCluster
from backends.sim.settings import ServerSettings
from gateway.registry import Role, TargetKey, WorkerRegistry, WorkerSpec
from gateway.upstream import make_transport


@pytest.mark.parametrize("version", ["0.5.1", "0.5.6", "0.5.9", "0.5.15"])
async def test_discovery_and_loads_for_each_server_age(version: str) -> None:
    settings = ServerSettings(dp_size=4, time_scale=0.01, sglang_version=version)
    transport = make_transport(max_connections=8, connect_timeout=1.0, read_timeout=5.0)
    async with SimCluster(ClusterSpec(servers=1, base=settings)) as cluster:
        url = cluster.servers[0].url
        registry = WorkerRegistry(
            [WorkerSpec(url)], transport, health_interval_s=0.2, load_interval_s=0.05, request_timeout_s=2.0
        )
        await registry.start()
        try:
            (worker,) = registry.workers()
            assert worker.version == version
            assert worker.dp_size == 4
            assert worker.model == cluster.servers[0].model
            assert worker.max_total_num_tokens > 0
            assert worker.role is Role.REGULAR
            deadline = asyncio.get_running_loop().time() + 3
            while registry.reported_load(TargetKey(url, 0)) is None:
                assert asyncio.get_running_loop().time() < deadline, "no load report"
                await asyncio.sleep(0.02)
            load = registry.reported_load(TargetKey(url, 0))
            assert load is not None and load.token_usage is not None
            if version != "0.5.1":  # before 2025-09 /get_load is one number for the whole server
                assert all(registry.reported_load(TargetKey(url, r)) is not None for r in range(4))
                assert load.running == 0 and load.waiting == 0
        finally:
            await registry.stop()
            await transport.aclose()


async def test_pd_roles_and_bootstrap_port_from_the_servers() -> None:
    transport = make_transport(max_connections=8, connect_timeout=1.0, read_timeout=5.0)
    spec = ClusterSpec(servers=0, prefill=1, decode=1, base=ServerSettings(dp_size=2, time_scale=0.01))
    async with SimCluster(spec) as cluster:
        registry = WorkerRegistry(
            [WorkerSpec(s.url) for s in cluster.servers],
            transport,
            health_interval_s=0.2,
            load_interval_s=0.1,
        )
        await registry.start()
        try:
            (prefill,) = registry.workers(role=Role.PREFILL)
            (decode,) = registry.workers(role=Role.DECODE)
            announced = {s.url: s.bootstrap_port for s in cluster.servers}
            assert prefill.bootstrap_port == announced[prefill.url] is not None
            assert decode.bootstrap_port is None
            assert prefill.dp_size == decode.dp_size == 2
        finally:
            await registry.stop()
            await transport.aclose()
