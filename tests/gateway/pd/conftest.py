"""Small SGLang PD stand-ins on real sockets (aiohttp), recording what they receive.

A fake prefill behaves like SGLang's: it waits until the decode of the same bootstrap room has
connected (the bootstrap queue), "prefills", publishes the room's KV and only then answers. A fake
decode waits for its room's KV (up to 30 s, standing in for SGLang's 300 s) and then answers; it
records when its client went away, so tests can check the gateway aborted it.

Like SGLang, a prefill reports a prompt it has prefilled before as cached (all but the last token),
and the decode reports the prefill's prompt and cached token counts (they travel with the KV): the
gateway corrects its prefix index from them, so a stand-in reporting no hit would read as eviction.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web

from gateway.pd import PDForwarder, PDSettings, RoomAllocator
from gateway.registry import Worker
from gateway.routing import Router, make_store
from gateway.upstream import make_transport
from policies.decode_load import DecodeLoad
from policies.prefix_aware import PrefixAware
from policies.types import Role, TargetKey

DECODE_KV_WAIT_S = 30.0
BOOTSTRAP_WAIT_S = 10.0


@dataclass
class Received:
    at: float
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    def rooms(self) -> list[int]:
        room = self.body["bootstrap_room"]
        return list(room) if isinstance(room, list) else [room]


class Hub:
    """What the fake servers share: which decodes connected to which room, which KV is ready."""

    def __init__(self) -> None:
        self.decode_connected: dict[int, asyncio.Event] = {}
        self.kv_ready: dict[int, asyncio.Event] = {}
        # room -> (prompt tokens, cached tokens) as the prefill counted them
        self.kv_tokens: dict[int, tuple[int, int]] = {}

    def _event(self, table: dict[int, asyncio.Event], room: int) -> asyncio.Event:
        return table.setdefault(room, asyncio.Event())

    def connect(self, room: int) -> None:
        self._event(self.decode_connected, room).set()

    async def wait_decode(self, room: int) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event(self.decode_connected, room).wait(), BOOTSTRAP_WAIT_S)
            return True
        return False

    def publish(self, room: int, tokens: tuple[int, int] = (8, 0)) -> None:
        self.kv_tokens[room] = tokens
        self._event(self.kv_ready, room).set()

    async def wait_kv(self, room: int) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event(self.kv_ready, room).wait(), DECODE_KV_WAIT_S)
            return True
        return False


@dataclass
class FakeServer:
    role: Role
    hub: Hub
    dp_size: int = 1
    bootstrap_port: int | None = None
    # "ok" | "fail500" | "drop" | "status400" | "hang" (prefill), "ok" | "fail500" | "status400" (decode)
    mode: str = "ok"
    prefill_delay_s: float = 0.02
    stream_chunks: int = 4
    # Decode: how long the generation takes once the KV has arrived (before the first byte).
    answer_delay_s: float = 0.0
    received: list[Received] = field(default_factory=list)
    cancelled_at: list[float] = field(default_factory=list)
    # Prompts this server has prefilled (its radix cache, with no eviction).
    prefilled: set[bytes] = field(default_factory=set)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        for path in ("/generate", "/v1/chat/completions", "/v1/completions"):
            app.router.add_post(path, self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def worker(self, model: str = "m") -> Worker:
        return Worker(
            url=self.url,
            model=model,
            role=self.role,
            dp_size=self.dp_size,
            max_total_num_tokens=100_000,
            version="0.5.15",
            bootstrap_port=self.bootstrap_port,
            healthy=True,
            discovered=True,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = msgspec.json.decode(raw)
        self.received.append(Received(time.perf_counter(), request.path, dict(request.headers), body))
        try:
            if self.role is Role.PREFILL:
                return await self._prefill(request, body)
            if self.role is Role.DECODE:
                return await self._decode(request, body)
            return await self._answer(request, body, first_token=5)
        except asyncio.CancelledError:
            self.cancelled_at.append(time.perf_counter())
            raise

    @staticmethod
    def _rooms(body: dict[str, Any]) -> list[int]:
        room = body.get("bootstrap_room")
        if room is None:
            return []
        return list(room) if isinstance(room, list) else [room]

    async def _prefill(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self.mode == "fail500":
            await asyncio.sleep(self.prefill_delay_s)
            return web.json_response(
                {"object": "error", "message": "prefill exploded", "code": 500}, status=500
            )
        if self.mode == "status400":
            return web.json_response({"error": {"message": "bad sampling"}}, status=400)
        if self.mode == "drop":
            await asyncio.sleep(self.prefill_delay_s)
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(1)
            raise web.HTTPInternalServerError
        rooms = self._rooms(body)
        if not rooms:
            return web.json_response(
                {"error": {"message": "Disaggregated request received without bootstrap room id."}},
                status=400,
            )
        for room in rooms:
            if not await self.hub.wait_decode(room):
                return web.json_response(
                    {"object": "error", "message": f"Prefill bootstrap failed for room {room}", "code": 500},
                    status=500,
                )
        if self.mode == "hang":
            await asyncio.sleep(3600)
        await asyncio.sleep(self.prefill_delay_s)
        prompt = msgspec.json.encode([body.get(name) for name in ("messages", "prompt", "text", "input_ids")])
        prompt_tokens = max(len(prompt) // 4, 1)
        cached = prompt_tokens - 1 if prompt in self.prefilled else 0
        self.prefilled.add(prompt)
        for room in rooms:
            self.hub.publish(room, (prompt_tokens, cached))
        meta: dict[str, Any] = {
            "finish_reason": {"type": "length", "length": 0},
            "prompt_tokens": prompt_tokens,
            "cached_tokens": cached,
        }
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = [[-1.0, 11, None], [-2.0, 12, None]]
        reply = {"text": "", "output_ids": [5], "meta_info": meta}
        if body.get("stream"):
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: " + msgspec.json.encode(reply) + b"\n\ndata: [DONE]\n\n")
            return response
        if len(rooms) > 1 and request.path == "/generate":
            return web.json_response([reply] * len(rooms))
        return web.json_response(reply)

    async def _decode(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self.mode == "status400":
            return web.json_response({"error": {"message": "bad sampling"}}, status=400)
        rooms = self._rooms(body)
        if not rooms:
            return web.json_response(
                {"error": {"message": "Disaggregated request received without bootstrap room id."}},
                status=400,
            )
        for room in rooms:
            self.hub.connect(room)
        for room in rooms:
            if not await self.hub.wait_kv(room):
                return web.json_response(
                    {"object": "error", "message": f"Decode transfer failed for room {room}", "code": 500},
                    status=500,
                )
        if self.mode == "fail500":
            return web.json_response(
                {"object": "error", "message": "decode exploded", "code": 500}, status=500
            )
        await asyncio.sleep(self.answer_delay_s)
        return await self._answer(request, body, first_token=5, tokens=self.hub.kv_tokens.get(rooms[0]))

    async def _answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        *,
        first_token: int,
        tokens: tuple[int, int] | None = None,
    ) -> web.StreamResponse:
        prompt_tokens, cached_tokens = tokens if tokens is not None else (8, 3)
        meta: dict[str, Any] = {
            "id": "r1",
            "finish_reason": {"type": "length", "length": self.stream_chunks},
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.stream_chunks,
            "cached_tokens": cached_tokens,
        }
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = [[None, 5, None]]
        if request.path == "/generate":
            final = {"text": "abcd", "output_ids": [first_token, 6, 7, 8], "meta_info": meta}
        else:
            final = {
                "id": "r1",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "abcd"},
                        "finish_reason": "length",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": 4,
                    "total_tokens": prompt_tokens + 4,
                    # as with --enable-cache-report: only when something was cached
                    "prompt_tokens_details": {"cached_tokens": cached_tokens} if cached_tokens else None,
                },
            }
        if not body.get("stream"):
            return web.json_response(final)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(self.stream_chunks):
            event = dict(final)
            event["text"] = "abcd"[: i + 1]
            await response.write(b"data: " + msgspec.json.encode(event) + b"\n\n")
            await asyncio.sleep(0.005)
        await response.write(b"data: [DONE]\n\n")
        return response


class FakeRegistry:
    def __init__(self, servers: list[FakeServer], model: str = "m") -> None:
        self.servers = servers
        self.model = model
        self.unhealthy: set[str] = set()

    def workers(
        self, model: str | None = None, role: Role | None = None, healthy_only: bool = True
    ) -> list[Worker]:
        out = []
        for server in self.servers:
            worker = server.worker(self.model)
            if healthy_only and server.url in self.unhealthy:
                continue
            if model is not None and worker.model != model:
                continue
            if role is not None and worker.role != role:
                continue
            out.append(worker)
        return out

    def models(self) -> list[str]:
        return [self.model]

    def reported_load(self, target: TargetKey) -> Any:
        return None


class Client:
    """The proxy's per-request state, and the ASGI messages sent to the client."""

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


class Endpoint:
    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path


CHAT = Endpoint("chat", "/v1/chat/completions")
COMPLETION = Endpoint("completion", "/v1/completions")
GENERATE = Endpoint("generate", "/generate")


@dataclass
class Cluster:
    hub: Hub
    prefill: list[FakeServer]
    decode: list[FakeServer]
    regular: list[FakeServer]
    registry: FakeRegistry
    transport: Any
    make: Callable[..., PDForwarder]

    @staticmethod
    def client() -> Client:
        return Client()


@pytest.fixture
async def pd_cluster() -> AsyncIterator[Callable[..., Any]]:
    started: list[FakeServer] = []
    transports: list[Any] = []

    async def build(
        prefill: int = 1,
        decode: int = 1,
        regular: int = 0,
        prefill_dp: int = 1,
        bootstrap_port: int | None = 9100,
        *,
        decode_dp: int = 1,
    ) -> Cluster:
        hub = Hub()
        p = [
            FakeServer(Role.PREFILL, hub, dp_size=prefill_dp, bootstrap_port=bootstrap_port)
            for _ in range(prefill)
        ]
        d = [FakeServer(Role.DECODE, hub, dp_size=decode_dp) for _ in range(decode)]
        r = [FakeServer(Role.REGULAR, hub) for _ in range(regular)]
        for server in (*p, *d, *r):
            await server.start()
            started.append(server)
        registry = FakeRegistry([*p, *d, *r])
        transport = make_transport(
            max_connections=64, connect_timeout=2.0, read_timeout=60.0, keepalive_expiry=4.0
        )
        transports.append(transport)

        def make(
            settings: PDSettings | None = None, seed: int = 1, rooms: RoomAllocator | None = None
        ) -> PDForwarder:
            return PDForwarder(
                registry,
                transport,
                prefill_router=Router(registry, make_store(), PrefixAware(), seed=seed, role=Role.PREFILL),
                decode_router=Router(registry, make_store(), DecodeLoad(), seed=seed, role=Role.DECODE),
                settings=settings,
                rooms=rooms,
            )

        return Cluster(hub, p, d, r, registry, transport, make)

    yield build
    for server in started:
        await server.stop()
    for transport in transports:
        await transport.aclose()
