"""PD disaggregation across processes: the prefill's bootstrap server and the decode's KV "transfer".

Real SGLang moves KV over RDMA/ZMQ after the decode has registered with the prefill's bootstrap server.
Here the decode long-polls a sim-private endpoint on that same bootstrap server (`GET /sim/kv/{room}`):
the first poll is the decode "connecting" (the prefill waits for it, like SGLang's bootstrap queue), and the
answer — once the prefill has computed the room — carries the first token and the prefill's cached_tokens.
Everything else on the bootstrap server mirrors SGLang's aiohttp `CommonKVBootstrapServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec
from aiohttp import web

from backends.sim.engine import PrefilledKV
from backends.sim.settings import ServerSettings

FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # SGLang's health checks use it to skip the transfer
LONG_POLL_S = 10.0
_PURGE_AFTER_S = 900.0


class KVTransferError(Exception):
    def __init__(self, message: str, *, lost_connection: bool = False, prefill_failed: bool = False) -> None:
        super().__init__(message)
        self.lost_connection = lost_connection
        self.prefill_failed = prefill_failed


class _KVReply(msgspec.Struct):
    first_token_id: int
    cached_tokens: int
    kv_tokens: int


@dataclass
class _Room:
    decode_connected: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    kv: PrefilledKV | None = None
    failure: str | None = None
    touched: float = field(default_factory=time.monotonic)


class RoomTable:
    """Per-room hand-off state on the prefill server, shared by its HTTP server and its bootstrap server."""

    def __init__(self) -> None:
        self._rooms: dict[int, _Room] = {}
        self._created = 0

    def _room(self, room: int) -> _Room:
        entry = self._rooms.get(room)
        if entry is None:
            entry = _Room()
            self._rooms[room] = entry
            self._created += 1
            if self._created % 256 == 0:
                self._purge()
        entry.touched = time.monotonic()
        return entry

    def _purge(self) -> None:
        cutoff = time.monotonic() - _PURGE_AFTER_S
        for room in [r for r, e in self._rooms.items() if e.touched < cutoff]:
            del self._rooms[room]

    async def wait_decode(self, room: int, timeout_s: float) -> bool:
        entry = self._room(room)
        try:
            await asyncio.wait_for(entry.decode_connected.wait(), timeout_s)
        except TimeoutError:
            self._rooms.pop(room, None)
            return False
        return True

    def publish(self, room: int, kv: PrefilledKV) -> None:
        entry = self._room(room)
        entry.kv = kv
        entry.ready.set()

    def fail(self, room: int, message: str) -> None:
        entry = self._room(room)
        entry.failure = message
        entry.ready.set()

    async def poll(self, room: int, wait_s: float) -> PrefilledKV | str | None:
        """Decode side of the hand-off: KV when ready, a failure message, or None if still pending."""
        entry = self._room(room)
        entry.decode_connected.set()
        if not entry.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.ready.wait(), wait_s)
        if not entry.ready.is_set():
            return None
        self._rooms.pop(room, None)
        return entry.kv if entry.kv is not None else (entry.failure or "prefill failed")

    def pending(self) -> int:
        return sum(1 for e in self._rooms.values() if not e.ready.is_set())

    def close(self) -> None:
        for entry in self._rooms.values():
            if not entry.ready.is_set():
                entry.failure = "The prefill server is shutting down."
                entry.ready.set()


class BootstrapServer:
    """SGLang's bootstrap HTTP server on a prefill node (aiohttp, like the real one)."""

    def __init__(
        self, settings: ServerSettings, rooms: RoomTable, http_port: int, dp_size: int, tp_size: int
    ) -> None:
        self._settings = settings
        self._dp_size = dp_size
        self._attn_tp_size = tp_size // dp_size
        self._rooms = rooms
        self._http_port = http_port
        self._runner: web.AppRunner | None = None
        self.port = settings.disaggregation_bootstrap_port
        self._dp_of_room: dict[int, int] = {}

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/route", self._route)
        app.router.add_post("/register_dp_rank", self._register_dp_rank)
        app.router.add_post("/query_dp_ranks", self._query_dp_ranks)
        app.router.add_get("/sim/kv/{room}", self._kv)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None:
            sockets = getattr(server, "sockets", None)
            if sockets:
                self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    def _rank_port(self, dp_rank: int) -> int:
        # Where the prefill rank's KV sender would listen (ZMQ in SGLang); informational in the sim.
        return (self.port + 1 + dp_rank) % 65536

    async def _route(self, request: web.Request) -> web.Response:
        s = self._settings
        if request.method == "PUT":
            return web.Response(text="OK")
        if request.method != "GET":
            return web.Response(status=405, text="405: Method Not Allowed")
        q = request.query
        try:
            dp_rank = int(q["prefill_dp_rank"])
            cp_rank = int(q.get("prefill_cp_rank", "-1"))
            tp_rank = int(q["target_tp_rank"])
            pp_rank = int(q["target_pp_rank"])
        except (KeyError, ValueError):
            return web.Response(status=400, text="Missing or invalid rank parameters")
        if dp_rank == -1 and tp_rank == -1 and pp_rank == -1:
            info = {
                "attn_tp_size": self._attn_tp_size,
                "attn_cp_size": 1,
                "dp_size": self._dp_size,
                "pp_size": 1,
                "page_size": s.page_size,
                "kv_cache_dtype": "auto",
                "follow_bootstrap_room": True,
                "enable_dsa_cache_layer_split": False,
                "prefill_http_port": self._http_port,
            }
            return web.json_response(info)
        if not (
            0 <= dp_rank < self._dp_size
            and 0 <= tp_rank < self._attn_tp_size
            and pp_rank == 0
            and cp_rank in (-1, 0)
        ):
            return web.Response(
                status=404,
                text=f"Bootstrap info not found for dp_rank={dp_rank} cp_rank={cp_rank} "
                f"tp_rank={tp_rank} pp_rank={pp_rank}",
            )
        return web.json_response({"rank_ip": s.host, "rank_port": self._rank_port(dp_rank)})

    async def _register_dp_rank(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            self._dp_of_room[int(data["bootstrap_room"])] = int(data["dp_rank"])
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="Invalid request")
        return web.Response(text="OK")

    async def _query_dp_ranks(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            rooms = [int(r) for r in data["bootstrap_rooms"]]
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="Invalid request")
        dp = self._dp_size
        return web.json_response({str(r): self._dp_of_room.get(r, r % dp) for r in rooms})

    async def _kv(self, request: web.Request) -> web.Response:
        try:
            room = int(request.match_info["room"])
            wait_s = min(float(request.query.get("wait_s", LONG_POLL_S)), 60.0)
        except ValueError:
            return web.Response(status=400, text="Invalid room")
        result = await self._rooms.poll(room, max(wait_s, 0.0))
        if result is None:
            return web.Response(status=204)
        if isinstance(result, str):
            return web.json_response({"error": result}, status=410)
        body = msgspec.json.encode(_KVReply(result.first_token_id, result.cached_tokens, result.kv_tokens))
        return web.Response(body=body, content_type="application/json")


class KVTransferClient:
    """Decode side: waits for a room's KV on the prefill's bootstrap server."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def fetch(self, host: str, port: int, room: int, timeout_s: float) -> PrefilledKV:
        deadline = time.monotonic() + timeout_s
        lost = False
        backoff = 0.02
        url = f"http://{host}:{port}/sim/kv/{room}"
        session = self._client()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KVTransferError("timed out", lost_connection=lost)
            wait_s = min(LONG_POLL_S, remaining)
            timeout = aiohttp.ClientTimeout(total=wait_s + 5.0, connect=min(5.0, remaining))
            try:
                async with session.get(url, params={"wait_s": f"{wait_s:.3f}"}, timeout=timeout) as resp:
                    lost = False
                    if resp.status == 200:
                        reply = msgspec.json.decode(await resp.read(), type=_KVReply)
                        return PrefilledKV(reply.first_token_id, reply.cached_tokens, reply.kv_tokens)
                    if resp.status == 410:
                        raise KVTransferError("prefill failed", prefill_failed=True)
                    if resp.status != 204:
                        await asyncio.sleep(min(backoff, max(remaining, 0)))
            except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError):
                lost = True
                await asyncio.sleep(min(backoff, max(deadline - time.monotonic(), 0)))
                backoff = min(backoff * 2, 0.5)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
