"""A small SGLang stand-in whose info, health and load endpoints tests can reshape at will."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web


class FakeSglang:
    def __init__(
        self,
        *,
        version: str = "0.5.15",
        dp_size: int = 2,
        new_info_paths: bool = True,
        models_endpoint: bool = True,
        mode: str = "null",
        bootstrap_port: int = 8998,
        loads: dict[str, Any] | None = None,
        get_load: Any = None,
        port: int = 0,
    ) -> None:
        self.version = version
        self.dp_size = dp_size
        self.new_info_paths = new_info_paths
        self.models_endpoint = models_endpoint
        self.mode = mode
        self.bootstrap_port = bootstrap_port
        self.loads = loads  # body of /v1/loads, None = 404
        self.get_load = get_load  # body of /get_load, None = 404
        self.healthy = True
        self.hits: dict[str, int] = {}
        self._port = port
        self._runner: web.AppRunner | None = None
        self.url = ""

    def server_info(self) -> dict[str, Any]:
        return {
            "model_path": "deepseek-ai/DeepSeek-V3",
            "served_model_name": "deepseek-v3",
            "tp_size": 8,
            "dp_size": self.dp_size,
            "disaggregation_mode": self.mode,
            "disaggregation_bootstrap_port": self.bootstrap_port,
            "page_size": 64,
            "max_total_num_tokens": 10000,
            "max_running_requests": 128,
            "context_length": None,
            "version": self.version,
            "internal_states": [{"last_gen_throughput": 1.0} for _ in range(self.dp_size)],
        }

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.hits[path] = self.hits.get(path, 0) + 1
        info_paths = ("/server_info", "/get_server_info") if self.new_info_paths else ("/get_server_info",)
        model_paths = ("/model_info", "/get_model_info") if self.new_info_paths else ("/get_model_info",)
        if path == "/forever":
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            while True:
                await response.write(b"data: {}\n\n")
                await asyncio.sleep(0.05)
        if path == "/health":
            return web.Response(status=200 if self.healthy else 503)
        if path in info_paths:
            return web.json_response(self.server_info())
        if path in model_paths:
            return web.json_response({"model_path": "deepseek-ai/DeepSeek-V3", "is_generation": True})
        if path == "/v1/models" and self.models_endpoint:
            card = {"id": "deepseek-v3", "object": "model", "max_model_len": 163840, "parent": None}
            return web.json_response({"object": "list", "data": [card]})
        if path == "/v1/loads" and self.loads is not None:
            return web.Response(body=json.dumps(self.loads), content_type="application/json")
        if path == "/get_load" and self.get_load is not None:
            return web.Response(body=json.dumps(self.get_load), content_type="application/json")
        return web.json_response({"detail": "Not Found"}, status=404)

    async def __aenter__(self) -> FakeSglang:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
