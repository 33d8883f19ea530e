"""Each DP rank's decode step, measured from the /v1/loads reports the registry polls."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.registry import DEFAULT_DECODE_STEP_S, TargetKey, WorkerRegistry, WorkerSpec
from gateway.registry._speeds import DecodeStepEstimate
from gateway.upstream import Transport, make_transport
from tests.gateway.registry._fake_sglang import FakeSglang


def test_a_steady_batch_converges_on_running_over_throughput() -> None:
    step = DecodeStepEstimate()
    assert step.observe(8, 200.0, DEFAULT_DECODE_STEP_S) is None  # no previous report: batch unknown
    for _ in range(30):
        step.observe(8, 200.0, DEFAULT_DECODE_STEP_S)
    assert step.step_s == pytest.approx(8 / 200.0, rel=0.01)


def test_idle_ranks_and_changing_batches_teach_nothing() -> None:
    step = DecodeStepEstimate()
    step.observe(0, 500.0, 0.02)
    step.observe(0, 500.0, 0.02)  # idle: the throughput is of some earlier batch
    assert step.step_s is None and step.samples == 0
    step.observe(4, 0.0, 0.02)
    step.observe(4, None, 0.02)  # a server that does not report throughput (/get_load)
    assert step.samples == 0
    step.observe(4, 100.0, 0.02)
    assert step.samples == 1
    before = step.step_s
    step.observe(32, 100.0, 0.02)  # the batch grew 8x since the last poll: the window is of the old one
    assert step.step_s == before and step.samples == 1


def test_one_odd_report_moves_the_step_by_at_most_a_quarter() -> None:
    step = DecodeStepEstimate()
    for _ in range(30):
        step.observe(10, 250.0, 0.02)
    settled = step.step_s
    assert settled is not None
    step.observe(10, 2.5, 0.02)  # 100x slower for one window
    assert settled < step.step_s <= settled * 2**0.3 + 1e-12


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    made = make_transport("aiohttp", max_connections=16, connect_timeout=1.0, read_timeout=2.0)
    yield made
    await made.aclose()


def _loads(rank1_running: int, rank1_throughput: float) -> dict[str, object]:
    return {
        "timestamp": "2026-07-01T00:00:00Z",
        "version": "0.5.15",
        "loads": [
            {"dp_rank": 0, "num_running_reqs": 0, "num_waiting_reqs": 0, "gen_throughput": 0.0},
            {
                "dp_rank": 1,
                "num_running_reqs": rank1_running,
                "num_waiting_reqs": 0,
                "gen_throughput": rank1_throughput,
            },
        ],
    }


async def test_the_registry_reports_each_ranks_measured_step(transport: Transport) -> None:
    async with FakeSglang(version="0.5.15", loads=_loads(16, 320.0)) as server:
        # No background loops: the test polls.
        registry = WorkerRegistry([WorkerSpec(server.url)], transport, load_interval_s=3600)
        await registry.start()
        try:
            for _ in range(30):
                assert await registry.poll_loads(server.url)
            idle = registry.reported_load(TargetKey(server.url, 0))
            busy = registry.reported_load(TargetKey(server.url, 1))
            assert idle is not None and idle.decode_step_s is None
            assert busy is not None and busy.decode_step_s == pytest.approx(16 / 320.0, rel=0.01)
            # The rank goes idle: the last measurement stays.
            server.loads = _loads(0, 320.0)
            assert await registry.poll_loads(server.url)
            still = registry.reported_load(TargetKey(server.url, 1))
            assert still is not None and still.decode_step_s == busy.decode_step_s
        finally:
            await registry.stop()
