"""PD end to end against the simulator in PD mode: real prefill and decode servers (whose decode
really waits for the prefill's room across the bootstrap server), the real registry discovering
roles and bootstrap ports, and the simulator's fault injection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from backends.sim.cluster import ClusterSpec, SimCluster
from backends.sim.settings import ServerSettings
from gateway.errors import GatewayError
from gateway.http._views import CHAT, GENERATE, Endpoint, decode_view
from gateway.pd import PDForwarder, PDSettings, make_pd_forwarder
from gateway.registry import WorkerRegistry, WorkerSpec
from gateway.upstream import Transport, UpstreamRequest, make_transport
from policies.types import Role

pytestmark = pytest.mark.timeout(60)

MODEL = "deepseek-ai/DeepSeek-V3"


class Client:
    def __init__(self) -> None:
        self.started = False
        self.streaming = False
        self.completing = False
        self.disconnected = False
        self.messages: list[dict[str, Any]] = []

    async def send(self, message: Any) -> None:
        self.messages.append(dict(message))

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.messages[0]["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


class Setup:
    def __init__(self, cluster: SimCluster, registry: WorkerRegistry, transport: Transport) -> None:
        self.cluster = cluster
        self.registry = registry
        self.transport = transport

    def forwarder(self, settings: PDSettings | None = None) -> PDForwarder:
        return make_pd_forwarder(self.registry, self.transport, settings, seed=3)

    async def set_faults(self, url: str, **faults: Any) -> None:
        response = await self.transport.send(
            UpstreamRequest(
                "POST",
                url + "/sim/faults",
                [("content-type", "application/json")],
                msgspec.json.encode(faults),
            )
        )
        await response.aread()
        await response.aclose()
        assert response.status == 200


@pytest.fixture
async def sim() -> AsyncIterator[Setup]:
    spec = ClusterSpec(servers=0, prefill=2, decode=2, base=ServerSettings(time_scale=0.01, dp_size=2))
    async with SimCluster(spec) as cluster:
        transport = make_transport(
            max_connections=128, connect_timeout=2.0, read_timeout=60.0, keepalive_expiry=4.0
        )
        specs = [WorkerSpec(url=s.url) for s in cluster.servers]  # roles and ports are discovered
        registry = WorkerRegistry(specs, transport, health_interval_s=5.0, load_interval_s=0.5)
        await registry.start()
        try:
            for _ in range(50):
                if len(registry.workers(model=MODEL)) == 4:
                    break
                await asyncio.sleep(0.1)
            yield Setup(cluster, registry, transport)
        finally:
            await registry.stop()
            await transport.aclose()


async def forward(forwarder: PDForwarder, endpoint: Endpoint, payload: dict[str, Any]) -> Client:
    client = Client()
    body = msgspec.json.encode(payload)
    handled = await forwarder.forward(
        endpoint=endpoint,
        request=decode_view(endpoint, body, lambda: MODEL),
        body=body,
        headers=[("content-type", "application/json")],
        send=client.send,
        client=client,
    )
    assert handled
    return client


CHAT_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me about Paris."}],
    "max_tokens": 8,
}


async def test_registry_discovers_pools_and_bootstrap_ports(sim: Setup) -> None:
    prefill = sim.registry.workers(model=MODEL, role=Role.PREFILL)
    decode = sim.registry.workers(model=MODEL, role=Role.DECODE)
    assert len(prefill) == 2 and len(decode) == 2
    ports = {s.url: s.bootstrap_port for s in sim.cluster.servers if s.role == "prefill"}
    assert {w.url: w.bootstrap_port for w in prefill} == ports


async def test_chat_and_streaming_generate_are_served_by_a_pair(sim: Setup) -> None:
    forwarder = sim.forwarder()
    client = await forward(forwarder, CHAT, CHAT_BODY)
    assert client.status == 200, client.body
    answer = msgspec.json.decode(client.body)
    assert answer["usage"]["completion_tokens"] == 8
    assert client.headers["x-cachet-prefill-worker"] != client.headers["x-cachet-worker"]
    client = await forward(
        forwarder,
        GENERATE,
        {"text": "The capital of France", "sampling_params": {"max_new_tokens": 6}, "stream": True},
    )
    assert client.status == 200
    events = [e for e in client.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    final = msgspec.json.decode(events[-2][6:])
    assert final["meta_info"]["completion_tokens"] == 6
    assert final["meta_info"]["finish_reason"]["type"] == "length"


async def test_batch_generate_gives_every_item_its_own_room(sim: Setup) -> None:
    client = await forward(
        sim.forwarder(),
        GENERATE,
        {"text": ["a b c", "d e f", "g h i"], "sampling_params": {"max_new_tokens": 3}},
    )
    assert client.status == 200, client.body
    items = msgspec.json.decode(client.body)
    assert len(items) == 3
    assert all(item["meta_info"]["completion_tokens"] == 3 for item in items)


async def test_failing_prefill_aborts_the_decode_leg_within_a_second(sim: Setup) -> None:
    for server in sim.cluster.servers:
        if server.role == "prefill":
            await sim.set_faults(server.url, error_rate=1.0)
    forwarder = sim.forwarder(PDSettings(retries=1))
    began = time.perf_counter()
    with pytest.raises(GatewayError) as raised:
        await forward(forwarder, CHAT, CHAT_BODY)
    assert time.perf_counter() - began < 1.0
    assert raised.value.status == 503
    assert "prefill" in raised.value.message
    # (That the decode leg's connection is closed at once is asserted against recording stand-ins in
    # test_forwarder.py: the simulator does not expose a decode request still waiting for its KV.)


async def test_hanging_prefill_is_given_up_and_the_decode_leg_closed(sim: Setup) -> None:
    for server in sim.cluster.servers:
        if server.role == "prefill":
            await sim.set_faults(server.url, hang=True)
    forwarder = sim.forwarder(PDSettings(retries=0, prefill_timeout_s=0.5))
    began = time.perf_counter()
    with pytest.raises(GatewayError) as raised:
        await forward(forwarder, CHAT, CHAT_BODY)
    assert time.perf_counter() - began < 1.5
    assert raised.value.status == 504
    assert "no answer within 0.5s" in raised.value.message


async def test_one_broken_prefill_is_retried_on_the_other_with_a_new_room(sim: Setup) -> None:
    prefills = [s.url for s in sim.cluster.servers if s.role == "prefill"]
    await sim.set_faults(prefills[0], drop_after_chunks=0)
    forwarder = sim.forwarder(PDSettings(retries=2))
    for i in range(6):
        client = await forward(
            forwarder, CHAT, {**CHAT_BODY, "messages": [{"role": "user", "content": f"q {i}"}]}
        )
        assert client.status == 200, client.body
        assert client.headers["x-cachet-prefill-worker"] == prefills[1]


async def test_concurrent_requests_all_complete_with_distinct_rooms(sim: Setup) -> None:
    forwarder = sim.forwarder()
    bodies = [{**CHAT_BODY, "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(32)]
    clients = await asyncio.gather(*(forward(forwarder, CHAT, body) for body in bodies))
    assert all(c.status == 200 for c in clients)
    rooms = {c.headers["x-cachet-bootstrap-room"] for c in clients}
    assert len(rooms) == 32
