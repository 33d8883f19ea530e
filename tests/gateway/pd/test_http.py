"""PD over real HTTP: the gateway (regular proxy with PDProxy in front, as `python -m
loadtests.pd.gateway` builds it) on a real socket, the simulator in PD mode plus a regular server,
and the official openai client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import openai
import pytest
import uvicorn

from backends.sim.cluster import ClusterSpec, SimCluster
from backends.sim.settings import ServerSettings
from gateway.pd import PDSettings
from loadtests.pd.gateway import build_app

pytestmark = pytest.mark.timeout(90)

MODEL = "deepseek-ai/DeepSeek-V3"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def gateway_url() -> AsyncIterator[tuple[str, dict[str, str]]]:
    spec = ClusterSpec(servers=1, prefill=1, decode=1, base=ServerSettings(time_scale=0.01))
    async with SimCluster(spec) as cluster:
        roles = {s.url: s.role for s in cluster.servers}
        prefill = [[s.url, str(s.bootstrap_port)] for s in cluster.servers if s.role == "prefill"]
        decode = [s.url for s in cluster.servers if s.role == "decode"]
        regular = [s.url for s in cluster.servers if s.role == "regular"]
        app, gateway, _ = build_app(
            prefill=prefill, decode=decode, regular=regular, settings=PDSettings(direct_below_tokens=64)
        )
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        serving = asyncio.create_task(server.serve())
        try:
            for _ in range(200):
                if server.started and gateway.readiness()[0] and len(gateway.registry.workers()) == 3:
                    break
                await asyncio.sleep(0.05)
            yield f"http://127.0.0.1:{port}", roles
        finally:
            server.should_exit = True
            await serving


LONG = "Explain the history of the Paris metro in detail. " * 40


async def test_openai_client_through_pd_and_direct(gateway_url: tuple[str, dict[str, str]]) -> None:
    url, roles = gateway_url
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=8
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert roles[raw.headers["x-cachet-worker"]] == "decode"
    assert roles[raw.headers["x-cachet-prefill-worker"]] == "prefill"
    assert int(raw.headers["x-cachet-bootstrap-room"]) >= 0

    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": LONG + "?"}], max_tokens=6, stream=True
    )
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text

    # A short prompt is cheaper to prefill where it is decoded: it goes to the regular server.
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert roles[raw.headers["x-cachet-worker"]] == "regular"
    assert "x-cachet-prefill-worker" not in raw.headers

    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=-1
        )
    await client.close()
