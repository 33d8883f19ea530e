"""A Cachet gateway process with PD wired in front of the regular proxy (gateway.pd.asgi.PDProxy).

Until the HTTP layer wires PD itself this is how PD is served over HTTP (benchmarks, tests):

    python -m loadtests.pd.gateway --port 8000 --prefill http://127.0.0.1:30001 30500 \
        --decode http://127.0.0.1:30002 [--worker http://127.0.0.1:30000] [--direct-below 256]

It prints ``CACHET-PD-READY http://host:port`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from litestar import Litestar

from gateway.app import Gateway
from gateway.config import GatewayConfig, WorkerEntry
from gateway.http import GatewayASGI, Proxy, ProxySettings, build_litestar
from gateway.pd import PDForwarder, PDSettings, make_pd_forwarder, pd_worker_specs
from gateway.pd.asgi import PDProxy


def build_app(
    *,
    prefill: list[list[str]],
    decode: list[str],
    regular: list[str],
    settings: PDSettings,
    policy: str = "prefix_aware",
    seed: int | None = None,
) -> tuple[GatewayASGI, Gateway, PDForwarder]:
    """The ASGI app of a gateway serving ``regular`` workers and the given PD pools."""
    specs = pd_worker_specs(prefill, decode)
    entries = [WorkerEntry(url=url) for url in regular] + [
        WorkerEntry(url=s.url, role=s.role.value, bootstrap_port=s.bootstrap_port) for s in specs
    ]
    config = GatewayConfig(
        workers=tuple(entries), policy=policy, seed=seed, health_interval_s=2.0, load_interval_s=0.5
    )
    gateway = Gateway.from_config(config)
    report_failure: Any = getattr(gateway.registry, "report_failure", None)
    pd = make_pd_forwarder(
        gateway.registry,  # type: ignore[arg-type]
        gateway.transport,
        settings,
        seed=seed,
        on_connect_failure=report_failure,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        await gateway.start()
        await pd.start()
        try:
            yield
        finally:
            await pd.aclose()
            await gateway.stop()

    proxy = Proxy(
        router=gateway.router,
        transport=gateway.transport,
        models=gateway.registry.models,
        telemetry=gateway.telemetry,
        settings=ProxySettings(max_body_bytes=config.max_body_bytes, retries=config.retries),
        on_connect_failure=report_failure,
    )
    front = PDProxy(proxy, pd, models=gateway.registry.models, telemetry=gateway.telemetry)
    app = GatewayASGI(front, build_litestar(gateway, lifespan=lifespan))
    return app, gateway, pd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.pd.gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", nargs="+", action="append", default=[], metavar="URL [BOOTSTRAP_PORT]")
    parser.add_argument("--decode", action="append", default=[], metavar="URL")
    parser.add_argument("--worker", action="append", default=[], metavar="URL", help="regular worker")
    parser.add_argument(
        "--direct-below", type=int, default=0, help="conditional disaggregation threshold (tokens)"
    )
    parser.add_argument(
        "--fallback", action="store_true", help="serve on regular workers when a PD pool is down"
    )
    parser.add_argument("--policy", default="prefix_aware", help="policy of the regular router")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    settings = PDSettings(direct_below_tokens=args.direct_below, fallback_to_regular=args.fallback)
    try:
        app, _, _ = build_app(
            prefill=args.prefill,
            decode=args.decode,
            regular=args.worker,
            settings=settings,
            policy=args.policy,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.05)
        if server.started:
            print(f"CACHET-PD-READY http://{args.host}:{args.port}", flush=True)
        await serving

    asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
