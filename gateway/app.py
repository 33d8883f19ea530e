"""The gateway application: components built once from the config, one ASGI app in front of them.

    gateway = Gateway.from_config(config)        # transport, registry, router, telemetry, metrics
    app = create_app(gateway)                    # ASGI: hot paths raw, the rest litestar
    uvicorn.run(app, ...)                        # lifespan starts and stops the components

The three generation endpoints are served by raw ASGI handlers (gateway.http.proxy) that the app
dispatches to by exact path before litestar is involved; health, models and admin endpoints are
ordinary litestar routes. ``app_from_environment`` is the factory uvicorn's worker processes
import (the parent passes the resolved config in CACHET_RESOLVED_CONFIG).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import msgspec
from litestar import Litestar

from gateway.config import GatewayConfig
from gateway.http import GatewayASGI, Proxy, ProxySettings, RouterLike, build_litestar
from gateway.metrics import METRICS_DIR_ENV, Metrics, MetricsDirectory
from gateway.pd import PDForwarder, PDSettings, make_pd_forwarder
from gateway.pd.asgi import PDProxy
from gateway.registry import Worker, WorkerRegistry, WorkerSpec
from gateway.routing import make_router
from gateway.telemetry import Telemetry
from gateway.upstream import DEFAULT_TRANSPORT, Transport, make_transport
from policies.types import Role

__all__ = [
    "RESOLVED_CONFIG_ENV",
    "Gateway",
    "RegistryAPI",
    "app_from_environment",
    "configure_logging",
    "create_app",
    "tune_gc_for_serving",
]

logger = logging.getLogger("cachet.gateway")

RESOLVED_CONFIG_ENV = "CACHET_RESOLVED_CONFIG"
# Health checks, discovery and load polls: a few connections per server, never the proxy's pool.
_CONTROL_CONNECTIONS = 32
# Allocations between young-generation collections while serving (CPython's default is 700).
_GC_YOUNG_THRESHOLD = 50_000


def configure_logging(level: str) -> None:
    """Cachet's log lines on stderr: one format for every serving process (the parent and each of
    `gateway serve --workers N`'s children, which start with Python's bare defaults)."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def tune_gc_for_serving() -> None:
    """Make the cyclic garbage collector cheap for a long-running proxy process.

    A proxied request allocates a few hundred short-lived objects, so CPython's default threshold
    (700) runs a young collection every few requests and, every so often, a full one that walks
    every object the process has ever kept (litestar's routes, msgspec types, the prefix index).
    Measured with loadtests/overhead (docs/benchmarks.md) the collector was the largest avoidable
    cost on the hot path: streamed req/s at 32 connections ~4.5k -> ~8k and p99 ~50 -> ~9 ms. Freezing
    what start-up built moves it out of every later collection; the higher threshold makes the
    young collections rare. Called once, after the app is built, by the serving entry points only
    (never on import: tests and embedders keep the interpreter's defaults).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, 20, 100)


class RegistryAPI(Protocol):
    """What the app needs of gateway.registry.WorkerRegistry (tests may pass a fake)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def workers(
        self, model: str | None = None, role: Role | None = None, healthy_only: bool = True
    ) -> Sequence[Worker]: ...

    def models(self) -> list[str]: ...

    async def add(self, spec: WorkerSpec) -> Worker: ...

    async def remove(self, url: str) -> bool: ...


class _Startable(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class Gateway:
    """The running parts of one gateway process."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        transport: Transport,
        registry: RegistryAPI,
        control_transport: Transport | None = None,
        router: RouterLike,
        telemetry: Telemetry | None = None,
        pd: PDForwarder | None = None,
        metrics: Metrics | None = None,
        metrics_dir: str | None = None,
    ) -> None:
        self.config = config
        # Prefill/decode pools (gateway.pd); None: regular workers only.
        self.pd = pd
        self.transport = transport
        # The registry's transport when it has its own (closed with the gateway).
        self.control_transport = control_transport
        self.registry = registry
        self.router = router
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        # This process's Prometheus counters (GET /metrics), shared through ``metrics_dir`` with
        # the other processes of `gateway serve --workers N`.
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics_directory = (
            MetricsDirectory(metrics_dir, self.metrics) if metrics_dir is not None else None
        )

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Gateway:
        transport_name = config.upstream_transport
        if config.transport is None and transport_name != DEFAULT_TRANSPORT:
            logger.info(
                "using the %s transport: %s (the default) speaks http:// only and some workers are https://",
                transport_name,
                DEFAULT_TRANSPORT,
            )
        transport = make_transport(
            transport_name,
            max_connections=config.max_connections,
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            keepalive_expiry=config.keepalive_expiry_s,
        )
        specs = [
            WorkerSpec(url=w.url, role=Role(w.role), bootstrap_port=w.bootstrap_port, model=w.model)
            for w in config.workers
        ]
        # The registry's own small pool: a proxy pool saturated by clients must not delay (or fail)
        # health checks and so take healthy servers out.
        control_transport = make_transport(
            transport_name,
            max_connections=_CONTROL_CONNECTIONS,
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            keepalive_expiry=config.keepalive_expiry_s,
        )
        registry = WorkerRegistry(
            specs,
            control_transport,
            health_interval_s=config.health_interval_s,
            fail_threshold=config.health_fail_threshold,
            recover_threshold=config.health_recover_threshold,
            load_interval_s=config.load_interval_s,
            configured_models=config.models,
        )
        router = make_router(config.policy, registry, redis_url=config.redis_url, seed=config.seed)
        pd = make_pd_forwarder(
            registry,
            transport,
            PDSettings(
                direct_below_tokens=config.pd_direct_below_tokens,
                fallback_to_regular=config.pd_fallback_to_regular,
                retries=config.retries,
                retry_after_s=config.retry_after_s,
                prefill_timeout_s=config.pd_prefill_timeout_s,
            ),
            redis_url=config.redis_url,
            seed=config.seed,
            on_connect_failure=registry.report_failure,
        )
        return cls(
            config,
            transport=transport,
            control_transport=control_transport,
            registry=registry,
            router=router,
            telemetry=Telemetry(otlp_endpoint=config.otlp_endpoint),
            pd=pd,
            metrics_dir=os.environ.get(METRICS_DIR_ENV) or None,
        )

    def expected_models(self) -> list[str]:
        """Models /readiness waits for: the configured list, else every model the workers serve."""
        if self.config.models:
            return list(self.config.models)
        return self.registry.models()

    def render_metrics(self) -> bytes:
        """GET /metrics: this process's counters, or every process's when they share a directory."""
        metrics = self.metrics if self.metrics_directory is None else self.metrics_directory.collect()
        return metrics.render(self.registry.workers(healthy_only=False))

    def readiness(self) -> tuple[bool, dict[str, int]]:
        """(ready, healthy workers per expected model)."""
        expected = self.expected_models()
        healthy = {model: len(self.registry.workers(model=model, healthy_only=True)) for model in expected}
        # A server that was never reached names no model: it cannot hold readiness back (one dead
        # server out of ten must not take the whole gateway out of its load balancer).
        return bool(expected) and all(count > 0 for count in healthy.values()), healthy

    async def start(self) -> None:
        if self.metrics_directory is not None:
            await self.metrics_directory.start()
        await self.registry.start()
        router_start: Callable[[], Any] | None = getattr(self.router, "start", None)
        if router_start is not None:
            await router_start()
        self._warn_if_state_is_local_only()
        if self.pd is not None:
            await self.pd.start()
        logger.info(
            "gateway ready to route: %d worker(s), models %s, policy %s, state %s",
            len(self.registry.workers(healthy_only=False)),
            self.registry.models(),
            self.config.policy,
            "redis" if self.config.redis_url else "embedded",
        )

    def _warn_if_state_is_local_only(self) -> None:
        """Say so when Redis did not answer: routing goes on, but on this process's own state."""
        if self.config.redis_url is None:
            return
        router_status: Callable[[], Any] | None = getattr(self.router, "status", None)
        store = router_status().get("store", {}) if router_status is not None else {}
        if store.get("redis_connected") is False:
            error = store.get("last_error") or "no answer"
            logger.warning(
                "Redis at %s is not reachable (%s): routing on this process's local state until it answers",
                self.config.public()["redis_url"],
                error,
            )

    async def stop(self) -> None:
        try:
            await self.registry.stop()
        finally:
            try:
                router_close: Callable[[], Any] | None = getattr(self.router, "aclose", None)
                if router_close is not None:
                    await router_close()
                if self.pd is not None:
                    await self.pd.aclose()
            finally:
                await self.transport.aclose()
                if self.control_transport is not None:
                    await self.control_transport.aclose()
                self.telemetry.shutdown()
                if self.metrics_directory is not None:
                    await self.metrics_directory.stop()


def create_app(gateway: Gateway) -> GatewayASGI:
    """The ASGI app serving ``gateway``; its lifespan starts and stops the gateway's components."""

    @asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    config = gateway.config
    report_failure: Callable[[str], None] | None = getattr(gateway.registry, "report_failure", None)
    proxy = Proxy(
        router=gateway.router,
        transport=gateway.transport,
        models=gateway.registry.models,
        telemetry=gateway.telemetry,
        settings=ProxySettings(
            max_body_bytes=config.max_body_bytes, retries=config.retries, retry_after_s=config.retry_after_s
        ),
        on_connect_failure=report_failure,
        metrics=gateway.metrics,
    )
    front: Proxy | PDProxy = proxy
    if gateway.pd is not None:
        gateway.pd.metrics = gateway.metrics
        # PD pools in front of the regular path: a request for a model without pools (or any
        # request while no PD server is registered) goes straight through to the proxy.
        front = PDProxy(
            proxy,
            gateway.pd,
            models=gateway.registry.models,
            telemetry=gateway.telemetry,
            max_body_bytes=config.max_body_bytes,
            metrics=gateway.metrics,
        )
    return GatewayASGI(front, build_litestar(gateway, lifespan=lifespan))


def app_from_environment() -> GatewayASGI:
    """Factory for uvicorn worker processes: the config resolved by the parent, from the environment."""
    raw = os.environ.get(RESOLVED_CONFIG_ENV)
    if raw is None:
        raise RuntimeError(f"{RESOLVED_CONFIG_ENV} is not set; start the gateway with `gateway serve`")
    config = msgspec.json.decode(raw.encode(), type=GatewayConfig)
    configure_logging(config.log_level)
    app = create_app(Gateway.from_config(config))
    tune_gc_for_serving()
    return app
