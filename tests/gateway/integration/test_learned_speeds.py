"""A heterogeneous cluster as processes: an 8×H200 server beside a 16×H20 TP16 pair (simulated in
real time), the gateway in this process so its learned speeds can be read.

Both servers start from the same speed seed (SGLang advertises none); after warm-up the gateway
must have measured both within 1.5× of the engine model's speeds and send more of a cache-miss
workload to the faster server.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from backends.sim.engine import EngineConfig, ServerEngine
from gateway.app import Gateway, create_app
from gateway.config import GatewayConfig, WorkerEntry
from tests.conftest import ChildProcess, find_free_port, wait_for_http

pytestmark = pytest.mark.timeout(180)

PROMPT_TOKENS = 4000
CLIENTS = 3
WARM_UP = 30
MEASURED = 45


def engine_speed(preset: str) -> float:
    """The simulator's own prefill speed for a full chunk, tokens/s per rank."""
    return ServerEngine(EngineConfig(preset=preset)).nominal_prefill_tokens_per_s()


def sim(preset: str) -> tuple[ChildProcess, str]:
    port = find_free_port()
    process = ChildProcess(
        [
            sys.executable,
            "-m",
            "backends.sim",
            "serve",
            "--port",
            str(port),
            "--preset",
            preset,
            "--enable-cache-report",
            "--time-scale",
            "1.0",
        ]
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/health", timeout=60, process=process)
    return process, url


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, str]]:
    started = [sim("h200-tp8"), sim("h20-tp16")]
    try:
        yield {"h200-tp8": started[0][1], "h20-tp16": started[1][1]}
    finally:
        for process, _ in started:
            process.stop()


def miss(i: int) -> dict[str, Any]:
    """A prompt of 4,000 token ids no server has seen (its first id is unique)."""
    ids = [1000 + i] + [(i * 7919 + k * 31) % 120_000 + 100 for k in range(PROMPT_TOKENS - 1)]
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}, "stream": True}


async def test_the_faster_server_is_measured_faster_and_gets_more_misses(servers: dict[str, str]) -> None:
    config = GatewayConfig(
        workers=tuple(WorkerEntry(url=url) for url in servers.values()),
        load_interval_s=0.25,
        log_level="warning",
    )
    gateway = Gateway.from_config(config)
    port = find_free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(gateway), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    counter = iter(range(10_000))
    placed: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            for _ in range(600):
                if server.started and (await client.get("/readiness")).status_code == 200:
                    break
                await asyncio.sleep(0.05)

            async def one() -> str:
                async with client.stream("POST", "/generate", json=miss(next(counter))) as reply:
                    assert reply.status_code == 200
                    async for _ in reply.aiter_bytes():
                        pass
                    return reply.headers["x-cachet-worker"]

            async def clients(total: int) -> list[str]:
                done: list[str] = []

                async def loop() -> None:
                    while len(done) + CLIENTS <= total + CLIENTS - 1:
                        done.append(await one())

                await asyncio.gather(*(loop() for _ in range(CLIENTS)))
                return done

            await clients(WARM_UP)
            placed = await clients(MEASURED)
    finally:
        server.should_exit = True
        await serving

    status = gateway.router.status()  # type: ignore[attr-defined]
    learning = status["prefill_speed_learning"]["workers"]
    fast, slow = servers["h200-tp8"], servers["h20-tp16"]
    report = json.dumps({"placed": {u: placed.count(u) for u in servers.values()}, "learning": learning})
    for preset, url in servers.items():
        truth = engine_speed(preset)
        assert url in learning, (preset, json.dumps(status, default=str))
        measured = learning[url]["prefill_tokens_per_s"]
        assert truth / 1.5 <= measured <= truth * 1.5, (preset, truth, report)
    assert learning[fast]["prefill_tokens_per_s"] > 2 * learning[slow]["prefill_tokens_per_s"], report
    assert placed.count(fast) > placed.count(slow), report
