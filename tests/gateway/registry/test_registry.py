"""The worker registry against small local SGLang stand-ins over real sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.registry import ReportedLoad, Role, TargetKey, WorkerRegistry, WorkerSpec
from gateway.upstream import Transport, UpstreamRequest, make_transport
from tests.gateway.registry._fake_sglang import FakeSglang
from tests.gateway.upstream._server import closed_port

FAST = {"health_interval_s": 0.05, "load_interval_s": 0.05, "request_timeout_s": 1.0}


@pytest.fixture(params=["aiohttp", "httptools"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    made = make_transport(request.param, max_connections=16, connect_timeout=1.0, read_timeout=2.0)
    yield made
    await made.aclose()


async def eventually(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_discovers_a_current_server(transport: Transport) -> None:
    async with FakeSglang(version="0.5.15", dp_size=4) as server:
        registry = WorkerRegistry([WorkerSpec(server.url + "/")], transport, **FAST)
        await registry.start()
        try:
            (worker,) = registry.workers()
            assert worker.url == server.url
            assert worker.model == "deepseek-v3"
            assert worker.model_path == "deepseek-ai/DeepSeek-V3"
            assert worker.role is Role.REGULAR
            assert (worker.dp_size, worker.page_size, worker.max_total_num_tokens) == (4, 64, 10000)
            assert worker.version == "0.5.15"
            assert worker.context_length == 163840
            assert worker.bootstrap_port is None  # only prefill servers have one
            assert worker.healthy and worker.discovered
            assert worker.prefill_tokens_per_s > 0 and worker.decode_step_s > 0
            assert worker.targets() == [TargetKey(server.url, r) for r in range(4)]
            assert registry.models() == ["deepseek-v3"]
            assert server.hits.get("/get_server_info") is None
        finally:
            await registry.stop()


async def test_discovers_an_old_server_through_the_get_aliases(transport: Transport) -> None:
    async with FakeSglang(version="0.5.2", dp_size=1, new_info_paths=False, models_endpoint=False) as server:
        registry = WorkerRegistry([WorkerSpec(server.url, model="alias")], transport, **FAST)
        await registry.start()
        try:
            (worker,) = registry.workers(model="alias")
            assert worker.version == "0.5.2"
            assert worker.context_length is None
            assert server.hits["/get_server_info"] >= 1
        finally:
            await registry.stop()


async def test_prefill_role_and_bootstrap_port(transport: Transport) -> None:
    async with (
        FakeSglang(mode="prefill", bootstrap_port=9100) as prefill,
        FakeSglang(mode="decode") as decode,
    ):
        registry = WorkerRegistry(
            [WorkerSpec(prefill.url), WorkerSpec(decode.url, role=Role.DECODE, bootstrap_port=1)],
            transport,
            **FAST,
        )
        await registry.start()
        try:
            (p,) = registry.workers(role=Role.PREFILL)
            (d,) = registry.workers(role=Role.DECODE)
            assert p.bootstrap_port == 9100
            assert d.bootstrap_port == 1  # the spec's word wins
        finally:
            await registry.stop()
        registry = WorkerRegistry([WorkerSpec(prefill.url, bootstrap_port=7777)], transport, **FAST)
        await registry.start()
        assert registry.workers()[0].bootstrap_port == 7777
        await registry.stop()


async def test_health_thresholds_and_recovery(transport: Transport) -> None:
    async with FakeSglang() as server:
        registry = WorkerRegistry(
            [WorkerSpec(server.url)], transport, fail_threshold=3, recover_threshold=2, **FAST
        )
        await registry.start()
        try:
            assert registry.workers()
            generation = registry.generation
            mine = registry.workers()
            mine.clear()  # callers get their own list
            assert registry.workers()
            server.healthy = False
            before = server.hits["/health"]
            await eventually(lambda: not registry.workers())
            assert server.hits["/health"] - before >= 3  # not out before three failures in a row
            assert registry.workers(healthy_only=False)[0].healthy is False
            assert registry.generation > generation
            assert registry.models() == ["deepseek-v3"]  # still known, just not routable
            server.dp_size = 3  # restarted with other settings while down
            server.healthy = True
            back = server.hits["/health"]
            await eventually(lambda: bool(registry.workers()))
            assert server.hits["/health"] - back >= 2
            assert registry.workers()[0].dp_size == 3  # re-discovered on recovery
        finally:
            await registry.stop()


async def test_coming_up_is_info_going_down_is_a_warning(
    transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cachet.registry")
    async with FakeSglang() as server:
        registry = WorkerRegistry([WorkerSpec(server.url)], transport, fail_threshold=1, **FAST)
        await registry.start()
        try:
            server.healthy = False
            await eventually(lambda: not registry.workers())
        finally:
            await registry.stop()
    levels = {record.getMessage(): record.levelno for record in caplog.records}
    assert levels[f"worker {server.url} is now healthy"] == logging.INFO
    assert levels[f"worker {server.url} is now UNHEALTHY"] == logging.WARNING


async def test_unreachable_at_start_is_retried_not_fatal(transport: Transport) -> None:
    port = closed_port()
    registry = WorkerRegistry([WorkerSpec(f"http://127.0.0.1:{port}")], transport, **FAST)
    await registry.start()
    try:
        assert registry.workers() == []
        (pending,) = registry.workers(healthy_only=False)
        assert not pending.discovered and not pending.healthy
        assert registry.models() == []
        async with FakeSglang(port=port):
            await eventually(lambda: bool(registry.workers()))
            assert registry.workers()[0].model == "deepseek-v3"
    finally:
        await registry.stop()


async def test_configured_models_count_as_served_before_any_server_answers(transport: Transport) -> None:
    # A server still loading its weights must make its model "unavailable, retry", not "unknown".
    down = closed_port()
    specs = [
        WorkerSpec(f"http://127.0.0.1:{down}"),
        WorkerSpec(f"http://127.0.0.1:{closed_port()}", model="r1"),
    ]
    registry = WorkerRegistry(specs, transport, configured_models=["deepseek-ai/DeepSeek-V3"], **FAST)
    await registry.start()
    try:
        assert registry.workers() == []
        assert registry.models() == ["deepseek-ai/DeepSeek-V3", "r1"]
        async with FakeSglang(port=down):
            await eventually(lambda: bool(registry.workers()))
            assert registry.models() == ["deepseek-ai/DeepSeek-V3", "deepseek-v3", "r1"]
    finally:
        await registry.stop()


def _v1_loads(aggregate: bool) -> dict[str, object]:
    body: dict[str, object] = {
        "timestamp": "2026-07-01T00:00:00Z",
        "version": "0.5.15",
        "loads": [
            {
                "dp_rank": 0,
                "num_running_reqs": 3,
                "num_waiting_reqs": 1,
                "token_usage": 0.5,
                "num_waiting_uncached_tokens": 77,
                "num_used_tokens": 5000,
                "max_total_num_tokens": 10000,
            },
            {"dp_rank": 1, "num_running_reqs": 0, "num_waiting_reqs": 0, "token_usage": 0.0},
        ],
    }
    if aggregate:
        body["dp_rank_count"] = 2
        body["aggregate"] = {"total_running_reqs": 3, "total_tokens": 5000}
    return body


@pytest.mark.parametrize(
    ("version", "loads", "get_load", "expected_rank0"),
    [
        ("0.5.15", _v1_loads(False), None, (1, 3, 0.5)),
        ("0.5.15", _v1_loads(True), None, (1, 3, 0.5)),
        # a version the table places before /v1/loads: /get_load, per-rank list with pending tokens
        (
            "0.5.6",
            None,
            [
                {
                    "dp_rank": 0,
                    "num_reqs": 4,
                    "num_waiting_reqs": 1,
                    "num_tokens": 5000,
                    "num_pending_tokens": 10,
                    "ts_tic": 1.0,
                },
                {"dp_rank": 1, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0},
            ],
            (1, 3, 0.5),
        ),
        (
            "0.5.2",
            None,
            [
                {"dp_rank": 0, "num_reqs": 4, "num_waiting_reqs": 1, "num_tokens": 5000},
                {"dp_rank": 1, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0},
            ],
            (1, 3, 0.5),
        ),
        ("0.4.9", None, {"load": 5000}, (None, None, 0.5)),
        # a new server that (unexpectedly) only has /get_load: the registry falls back
        (
            "0.5.15",
            None,
            [
                {"dp_rank": 0, "num_reqs": 4, "num_waiting_reqs": 1, "num_tokens": 5000},
                {"dp_rank": 1, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0},
            ],
            (1, 3, 0.5),
        ),
    ],
)
async def test_load_polling_for_each_shape(
    transport: Transport,
    version: str,
    loads: dict[str, object] | None,
    get_load: object,
    expected_rank0: tuple[int | None, int | None, float],
) -> None:
    async with FakeSglang(version=version, loads=loads, get_load=get_load) as server:
        now = [100.0]
        registry = WorkerRegistry([WorkerSpec(server.url)], transport, **FAST, clock=lambda: now[0])
        await registry.start()
        try:
            await eventually(lambda: registry.reported_load(TargetKey(server.url, 0)) is not None)
            load = registry.reported_load(TargetKey(server.url, 0))
            assert isinstance(load, ReportedLoad)
            assert (load.waiting, load.running, load.token_usage) == expected_rank0
            now[0] += 2.5
            aged = registry.reported_load(TargetKey(server.url, 0))
            assert aged is not None and aged.age_s == pytest.approx(2.5) and aged.age == aged.age_s
            assert registry.reported_load(TargetKey(server.url, 7)) is None
            assert registry.reported_load(TargetKey("http://elsewhere", 0)) is None
        finally:
            await registry.stop()


async def test_new_server_prefers_v1_loads(transport: Transport) -> None:
    async with FakeSglang(version="0.5.15", loads=_v1_loads(False), get_load={"load": 1}) as server:
        registry = WorkerRegistry([WorkerSpec(server.url)], transport, **FAST)
        await registry.start()
        try:
            version = registry.report_version
            assert await registry.poll_loads(server.url)
            assert server.hits.get("/get_load") is None
            # Routing re-reads just the targets a poll reported on.
            changed = registry.report_changes_since(version)
            assert changed is not None and {key.worker for key in changed} == {server.url}
            assert registry.report_version > version
            assert registry.report_changes_since(registry.report_version) == []
        finally:
            await registry.stop()


async def test_add_and_remove_at_run_time(transport: Transport) -> None:
    async with FakeSglang() as first, FakeSglang(dp_size=1) as second:
        registry = WorkerRegistry([WorkerSpec(first.url)], transport, **FAST)
        await registry.start()
        try:
            added = await registry.add(WorkerSpec(second.url))
            assert added.healthy and added.dp_size == 1
            assert {w.url for w in registry.workers()} == {first.url, second.url}
            assert await registry.add(WorkerSpec(second.url)) is registry.worker(second.url)
            assert await registry.remove(first.url + "/")
            assert not await registry.remove(first.url)
            assert [w.url for w in registry.workers()] == [second.url]
            hits = first.hits.get("/health", 0)
            await asyncio.sleep(0.2)
            assert first.hits.get("/health", 0) == hits  # its loops stopped
        finally:
            await registry.stop()


async def test_passive_failures_count_toward_the_threshold(transport: Transport) -> None:
    async with FakeSglang() as server:
        registry = WorkerRegistry(
            [WorkerSpec(server.url)],
            transport,
            fail_threshold=2,
            health_interval_s=30.0,
            request_timeout_s=1.0,
        )
        await registry.start()
        try:
            registry.report_failure(server.url)
            assert registry.workers()
            registry.report_failure(server.url)
            assert registry.workers() == []
        finally:
            await registry.stop()


def test_duplicate_specs_are_refused(transport: Transport) -> None:
    with pytest.raises(ValueError, match="twice"):
        WorkerRegistry([WorkerSpec("http://a:1"), WorkerSpec("http://a:1/")], transport)


async def test_a_saturated_gateway_does_not_take_healthy_servers_out() -> None:
    # One connection in the pool, held by a never-ending stream: health checks cannot even be sent.
    transport = make_transport("httptools", max_connections=1, connect_timeout=0.1, read_timeout=0.1)
    async with FakeSglang() as server:
        registry = WorkerRegistry(
            [WorkerSpec(server.url)],
            transport,
            fail_threshold=1,
            health_interval_s=0.05,
            load_interval_s=0.05,
            request_timeout_s=0.1,
        )
        await registry.start()
        try:
            held = await transport.send(UpstreamRequest("GET", server.url + "/forever"))
            checks = server.hits["/health"]
            await asyncio.sleep(0.6)
            assert server.hits["/health"] == checks  # nothing could be sent...
            assert registry.workers()  # ...and that is not held against the server
            await held.aclose()
            await eventually(lambda: server.hits["/health"] > checks)
            assert registry.workers()
        finally:
            await registry.stop()
            await transport.aclose()
