"""In-process fakes for the HTTP layer's tests: a scripted upstream transport and a static registry.

The router is the real one (round robin over the fake registry), so the tests exercise the real
routing seam; only the network is scripted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx

from gateway.app import Gateway, create_app
from gateway.config import GatewayConfig
from gateway.http import GatewayASGI
from gateway.registry import Worker, WorkerSpec
from gateway.routing import Outcome, Route, RoutingRequest, make_router
from gateway.upstream import UpstreamError, UpstreamRequest
from policies.types import Role, TargetKey

MODEL = "deepseek-ai/DeepSeek-V3"
NEW_VERSION = "0.5.15"


def worker(
    url: str, *, model: str = MODEL, dp_size: int = 1, healthy: bool = True, version: str = NEW_VERSION
) -> Worker:
    return Worker(
        url=url,
        model=model,
        dp_size=dp_size,
        max_total_num_tokens=100_000,
        version=version,
        healthy=healthy,
        discovered=True,
        context_length=163840,
    )


class FakeRegistry:
    def __init__(self, workers: Sequence[Worker]) -> None:
        self.items = {w.url: w for w in workers}
        self.failures: list[str] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def workers(
        self, model: str | None = None, role: Role | None = None, healthy_only: bool = True
    ) -> list[Worker]:
        return [
            w
            for w in self.items.values()
            if (model is None or w.model == model)
            and (role is None or w.role == role)
            and (w.healthy or not healthy_only)
        ]

    def models(self) -> list[str]:
        # Like WorkerRegistry: a server never reached names no model.
        return sorted({w.model for w in self.items.values() if w.discovered})

    def reported_load(self, target: TargetKey) -> Any:
        return None

    async def add(self, spec: WorkerSpec) -> Worker:
        added = worker(spec.url, model=spec.model or MODEL)
        self.items[spec.url] = added
        return added

    async def remove(self, url: str) -> bool:
        return self.items.pop(url, None) is not None

    def report_failure(self, url: str) -> None:
        self.failures.append(url)


class FakeResponse:
    """A scripted upstream response: ``chunks`` in order, then optionally ``fail_after`` raises."""

    def __init__(
        self,
        status: int = 200,
        chunks: Sequence[bytes] = (),
        *,
        content_type: str = "application/json",
        fail_with: UpstreamError | None = None,
        hang: bool = False,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.status = status
        self.headers = [("content-type", content_type), ("server", "uvicorn"), *headers]
        self._chunks = list(chunks)
        self._fail_with = fail_with
        self._hang = hang
        self.closed = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            await asyncio.sleep(0)
            yield chunk
        if self._hang:
            await asyncio.Event().wait()
        if self._fail_with is not None:
            raise self._fail_with

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        self.closed = True


Script = Callable[[UpstreamRequest], FakeResponse]


class FakeTransport:
    """Answers each request with ``script(request)`` (which may raise an UpstreamError)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[UpstreamRequest] = []
        self.responses: list[FakeResponse] = []

    async def send(self, request: UpstreamRequest) -> FakeResponse:
        self.requests.append(request)
        response = self.script(request)
        self.responses.append(response)
        return response

    async def aclose(self) -> None:
        return None


class RecordingRouter:
    """The real router, with every finish() outcome recorded."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.outcomes: list[tuple[str, Outcome]] = []
        self.store = inner.store

    async def route(self, req: RoutingRequest) -> Route[Any]:
        route: Route[Any] = await self.inner.route(req)
        return route

    async def finish(self, route: Route[Any], outcome: Outcome) -> None:
        self.outcomes.append((route.worker.url, outcome))
        await self.inner.finish(route, outcome)

    def recent_decisions(self, limit: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.inner.recent_decisions(limit)
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.inner.status()
        return result


class Harness:
    def __init__(self, workers: Sequence[Worker], script: Script, **config: Any) -> None:
        self.registry = FakeRegistry(workers)
        self.transport = FakeTransport(script)
        self.router = RecordingRouter(make_router("round_robin", self.registry, seed=1))
        self.config = GatewayConfig(**config)
        self.gateway = Gateway(
            self.config, transport=self.transport, registry=self.registry, router=self.router
        )
        self.app: GatewayASGI = create_app(self.gateway)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://gateway", timeout=10
        )


def sse(*events: bytes) -> list[bytes]:
    return [b"data: " + event + b"\n\n" for event in events] + [b"data: [DONE]\n\n"]
