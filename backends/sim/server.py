"""One simulated SGLang server: ASGI app, uvicorn listener, PD bootstrap server, run-time faults."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from backends.sim.asgi import (
    BodyTooLarge,
    Disconnected,
    HttpRequest,
    Receive,
    Scope,
    Send,
    encode_json,
)
from backends.sim.errors import METHOD_NOT_ALLOWED, NOT_FOUND, UNAUTHORIZED
from backends.sim.info import InfoHandlers
from backends.sim.native import GenerateHandler
from backends.sim.openai_api import OpenAIHandler
from backends.sim.pd import BootstrapServer
from backends.sim.runtime import Runtime
from backends.sim.session import CutConnection
from backends.sim.settings import Faults, ServerSettings

Handler = Callable[[HttpRequest], Awaitable[None]]
log = logging.getLogger("backends.sim")


class _QuietCutFilter(logging.Filter):
    """A cut connection is an injected fault, not an application error worth a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def _protocol_class(runtime: Runtime) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, able to reset new connections (the reset_connections fault)."""

    class SimHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if runtime.faults.reset_connections:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    # SO_LINGER 0: close with RST rather than FIN, like a crashed peer.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()

    return SimHttpProtocol


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handling: several servers share one process and the cluster owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class SimServer:
    """An SGLang look-alike; `await start()` returns once it is listening (health turns 200 after warm-up)."""

    def __init__(self, settings: ServerSettings, faults: Faults | None = None) -> None:
        self.settings = settings
        self.runtime = Runtime(settings, faults or Faults())
        self.info = InfoHandlers(self.runtime)
        self.port = settings.port
        self.bootstrap: BootstrapServer | None = None
        self._uvicorn: _Uvicorn | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._warmup_task: asyncio.Task[None] | None = None
        self._relisten_task: asyncio.Task[None] | None = None
        self._listening = True
        self._routes = self._build_routes()
        self._metrics = self.runtime.metrics if settings.enable_metrics else None

    # ---- public API ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def faults(self) -> Faults:
        return self.runtime.faults

    @property
    def bootstrap_port(self) -> int | None:
        return self.bootstrap.port if self.bootstrap is not None else None

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    async def set_faults(self, faults: Faults) -> None:
        faults.validate()
        self.runtime.set_faults(faults)
        await self._apply_listening()

    async def start(self) -> None:
        s = self.settings
        await self.runtime.start()
        sock = _listen_socket(s.host, s.port)
        self.port = int(sock.getsockname()[1])
        self.info.set_port(self.port)
        if s.disaggregation_mode == "prefill":
            self.bootstrap = BootstrapServer(
                s, self.runtime.rooms, self.port, self.runtime.dp_size, self.runtime.tp_size
            )
            await self.bootstrap.start()
            self.info.set_bootstrap_port(self.bootstrap.port)
        uvicorn_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _QuietCutFilter) for f in uvicorn_log.filters):
            uvicorn_log.addFilter(_QuietCutFilter())
        config = uvicorn.Config(
            self,
            http=_protocol_class(self.runtime),
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=1,
            proxy_headers=False,
        )
        self._uvicorn = _Uvicorn(config)
        self._serve_task = asyncio.get_running_loop().create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._serve_task.done():
                self._serve_task.result()
                raise RuntimeError("uvicorn exited during start-up")
            await asyncio.sleep(0.005)
        self._warmup_task = asyncio.get_running_loop().create_task(self.runtime.warm_up())
        await self._apply_listening()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        assert self._warmup_task is not None, "start() first"
        await asyncio.wait_for(asyncio.shield(self._warmup_task), timeout_s)

    async def stop(self) -> None:
        for task in (self._warmup_task, self._relisten_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.runtime.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._serve_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._serve_task
        if self.bootstrap is not None:
            await self.bootstrap.stop()

    # ---- connection refusal ----------------------------------------------------------------------------

    async def _apply_listening(self) -> None:
        faults = self.runtime.faults
        if faults.refuse_connections and self._listening:
            self._stop_listening()
            if faults.refuse_for_s > 0:
                if self._relisten_task is not None:
                    self._relisten_task.cancel()
                self._relisten_task = asyncio.get_running_loop().create_task(self._relisten_after(faults))
        elif not faults.refuse_connections and not self._listening:
            await self._resume_listening()

    def _stop_listening(self) -> None:
        assert self._uvicorn is not None
        for server in self._uvicorn.servers:
            server.close()
        self._listening = False

    async def _relisten_after(self, faults: Faults) -> None:
        await asyncio.sleep(faults.refuse_for_s)
        if self.runtime.faults is faults:
            self.runtime.set_faults(
                msgspec.structs.replace(faults, refuse_connections=False, refuse_for_s=0.0)
            )
        await self._resume_listening()

    async def _resume_listening(self) -> None:
        if self._listening or self._uvicorn is None:
            return
        uv = self._uvicorn
        config = uv.config
        loop = asyncio.get_running_loop()
        sock = _listen_socket(self.settings.host, self.port)

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=uv.server_state, app_state=uv.lifespan.state, _loop=loop
            )

        server = await loop.create_server(protocol, sock=sock, backlog=config.backlog)
        uv.servers = [server]
        self._listening = True

    # ---- ASGI ------------------------------------------------------------------------------------------

    def _build_routes(self) -> dict[str, tuple[frozenset[str], Handler]]:
        info = self.info
        version = self.runtime.version
        generate = GenerateHandler(self.runtime)
        routes: dict[str, tuple[frozenset[str], Handler]] = {
            "/generate": (frozenset({"POST", "PUT"}), generate),
            "/v1/chat/completions": (frozenset({"POST"}), OpenAIHandler(self.runtime, chat=True)),
            "/v1/completions": (frozenset({"POST"}), OpenAIHandler(self.runtime, chat=False)),
            "/v1/models": (frozenset({"GET"}), info.models),
            "/v1/embeddings": (frozenset({"POST"}), info.embeddings),
            "/health": (frozenset({"GET"}), info.health),
            "/health_generate": (frozenset({"GET"}), info.health),
            "/get_model_info": (frozenset({"GET"}), info.model_info),
            "/get_server_info": (frozenset({"GET"}), info.server_info),
            "/get_load": (frozenset({"GET"}), info.get_load),
            "/flush_cache": (frozenset({"GET", "POST"}), info.flush_cache),
            "/abort_request": (frozenset({"POST"}), info.abort_request),
            "/sim/faults": (frozenset({"GET", "POST", "DELETE"}), self._faults_endpoint),
            "/sim/state": (frozenset({"GET"}), self._state_endpoint),
        }
        if version.new_info_paths:
            routes["/model_info"] = (frozenset({"GET"}), info.model_info)
            routes["/server_info"] = (frozenset({"GET"}), info.server_info)
        if version.has_v1_loads:
            routes["/v1/loads"] = (frozenset({"GET"}), info.v1_loads)
        if self.settings.enable_metrics:
            routes["/metrics"] = (frozenset({"GET"}), info.metrics)
        return routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        req = HttpRequest(scope, receive, send)
        try:
            await self._dispatch(req)
        except (Disconnected, ConnectionError, CutConnection):
            return
        except BodyTooLarge:
            if not req.response_started:
                await req.respond(413, b'{"detail":"Request Entity Too Large"}')
        except Exception:
            log.exception("unhandled error on %s %s", req.method, req.path)
            if not req.response_started:
                await req.respond(500, b"Internal Server Error", content_type=b"text/plain; charset=utf-8")

    async def _dispatch(self, req: HttpRequest) -> None:
        path = req.path
        route = self._routes.get(path)
        if route is None:
            if path.startswith("/v1/models/"):
                if req.method != "GET":
                    await req.respond(405, METHOD_NOT_ALLOWED, extra_headers=[(b"allow", b"GET")])
                    return
                if not await self._authorised(req):
                    return
                await self.info.model(req, path[len("/v1/models/") :])
                return
            await req.respond(404, NOT_FOUND)
            return
        methods, handler = route
        if self._metrics is not None and req.method in methods:
            # Only known routes are counted, so random paths cannot grow the label set.
            self._metrics.http_started(path, req.method)
            try:
                await self._serve_route(req, methods, handler)
            finally:
                self._metrics.http_finished(path, req.method, req.status)
            return
        await self._serve_route(req, methods, handler)

    async def _serve_route(self, req: HttpRequest, methods: frozenset[str], handler: Handler) -> None:
        if req.method not in methods:
            if req.method == "OPTIONS" and "access-control-request-method" in req.headers:
                await self._preflight(req)
                return
            allow = ", ".join(sorted(methods)).encode()
            await req.respond(405, METHOD_NOT_ALLOWED, extra_headers=[(b"allow", allow)])
            return
        if not await self._authorised(req):
            return
        await handler(req)

    async def _authorised(self, req: HttpRequest) -> bool:
        key = self.settings.api_key
        if key is None or req.path.startswith(("/health", "/metrics", "/sim/")):
            return True
        if req.headers.get("authorization") == f"Bearer {key}":
            return True
        await req.respond(401, UNAUTHORIZED)
        return False

    async def _preflight(self, req: HttpRequest) -> None:
        origin = req.headers.get("origin", "*").encode("latin-1")
        headers = [
            (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
            (b"access-control-max-age", b"600"),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-headers", req.headers.get("access-control-request-headers", "").encode()),
            (b"access-control-allow-origin", origin),
        ]
        await req.start(
            200, [(b"content-length", b"2"), (b"content-type", b"text/plain; charset=utf-8"), *headers]
        )
        await req.send({"type": "http.response.body", "body": b"OK", "more_body": False})

    async def _faults_endpoint(self, req: HttpRequest) -> None:
        if req.method == "GET":
            await req.respond_json(200, self.runtime.faults)
            return
        if req.method == "DELETE":
            await self.set_faults(Faults())
            await req.respond_json(200, self.runtime.faults)
            return
        try:
            patch = msgspec.json.decode(await req.body())
            if not isinstance(patch, dict):
                raise ValueError("expected a JSON object of fault fields")
            merged: dict[str, Any] = {**msgspec.structs.asdict(self.runtime.faults), **patch}
            faults = msgspec.convert(merged, Faults)
            faults.validate()
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            await req.respond_json(400, {"error": str(exc)})
            return
        await self.set_faults(faults)
        await req.respond_json(200, faults)

    async def _state_endpoint(self, req: HttpRequest) -> None:
        runtime = self.runtime
        state = {
            "ready": runtime.ready,
            "url": self.url,
            "role": self.settings.role,
            "dp_size": runtime.dp_size,
            "inflight": [d.in_flight for d in runtime.drivers],
            "steps": [d.steps for d in runtime.drivers],
            "waiting_for_pd_peer": runtime.waiting_for_pd_peer,
            "faults": runtime.faults,
        }
        await req.respond(200, encode_json(state))


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock
