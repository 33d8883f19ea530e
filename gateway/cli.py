"""The ``gateway`` command (also ``python -m gateway``).

    gateway serve [--config FILE] [--host H] [--port P] [--worker URL]... [--policy NAME]
                  [--redis-url URL] [--workers N] ...
    gateway demo  [--port P] [--pd]   # a simulated DeepSeek cluster behind the gateway, ready to call

Settings come from flags > CACHET_* environment variables > the TOML config file > defaults (see
gateway.config).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from gateway.config import ConfigError, GatewayConfig, load_config
from policies.registry import policy_names

__all__ = ["build_parser", "main", "serve"]


def _worker_entry(role: str) -> Any:
    def parse(text: str) -> dict[str, Any]:
        url, _, port = text.partition(",")
        entry: dict[str, Any] = {"url": url.strip(), "role": role}
        if port:
            if role != "prefill":
                raise argparse.ArgumentTypeError("only --prefill takes a ,BOOTSTRAP_PORT suffix")
            try:
                entry["bootstrap_port"] = int(port)
            except ValueError:
                raise argparse.ArgumentTypeError(f"bootstrap port must be an integer, got {port!r}") from None
        return entry

    return parse


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: $CACHET_CONFIG)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument(
        "--workers",
        "--processes",
        dest="processes",
        type=int,
        metavar="N",
        help="gateway processes sharing the port (default 1; use --redis-url to share routing state)",
    )
    upstream = parser.add_argument_group("upstream servers (replace the config file's [[workers]])")
    upstream.add_argument(
        "--worker",
        dest="upstreams",
        action="append",
        type=_worker_entry("regular"),
        metavar="URL",
        help="an SGLang server (repeatable)",
    )
    upstream.add_argument(
        "--prefill",
        dest="upstreams",
        action="append",
        type=_worker_entry("prefill"),
        metavar="URL[,BOOTSTRAP_PORT]",
        help="a PD prefill server (repeatable)",
    )
    upstream.add_argument(
        "--decode",
        dest="upstreams",
        action="append",
        type=_worker_entry("decode"),
        metavar="URL",
        help="a PD decode server (repeatable)",
    )
    upstream.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help="a model this gateway serves: /readiness waits for it, and until one of its servers is "
        "healthy requests for it get 503 + Retry-After (repeatable; default: every model the servers serve)",
    )
    routing = parser.add_argument_group("routing")
    routing.add_argument("--policy", help=f"routing policy: {', '.join(policy_names())}")
    routing.add_argument("--redis-url", help="share routing state with other gateways through Redis")
    routing.add_argument("--seed", type=int, help="seed the policy's random choices (reproducible runs)")
    pd = parser.add_argument_group("PD disaggregation (models served by --prefill and --decode pools)")
    pd.add_argument(
        "--pd-direct-below",
        dest="pd_direct_below_tokens",
        type=int,
        metavar="TOKENS",
        help="send requests with fewer uncached prompt tokens to a regular server (default 0: never)",
    )
    pd.add_argument(
        "--pd-fallback",
        dest="pd_fallback_to_regular",
        action="store_const",
        const=True,
        help="when a PD pool has no healthy server, serve its model on regular servers instead of a 503",
    )
    pd.add_argument(
        "--pd-prefill-timeout",
        dest="pd_prefill_timeout_s",
        type=float,
        metavar="SECONDS",
        help="give up on a prefill leg (and abort its decode leg) after this long (default 120)",
    )
    limits = parser.add_argument_group("limits and timeouts")
    limits.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 4 MiB)")
    limits.add_argument(
        "--retries", type=int, help="other servers tried when one fails before its first byte"
    )
    limits.add_argument("--connect-timeout", dest="connect_timeout_s", type=float, help="seconds (default 2)")
    limits.add_argument(
        "--read-timeout", dest="read_timeout_s", type=float, help="seconds of upstream silence"
    )
    limits.add_argument("--health-interval", dest="health_interval_s", type=float, help="seconds (default 5)")
    limits.add_argument("--load-interval", dest="load_interval_s", type=float, help="seconds (default 1)")
    other = parser.add_argument_group("other")
    other.add_argument(
        "--transport",
        help="upstream HTTP client: httptools (default, http:// only), aiohttp (https too), httpx, httpx2",
    )
    other.add_argument(
        "--otlp-endpoint", help="OTLP/HTTP traces endpoint, e.g. http://127.0.0.1:4318/v1/traces"
    )
    other.add_argument("--admin-token", help="require this bearer token on /admin")
    other.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Cachet: a cache-aware gateway for SGLang.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the gateway")
    _serve_arguments(serve_parser)
    demo = commands.add_parser("demo", help="run a simulated DeepSeek cluster behind the gateway")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    demo.add_argument(
        "--port", type=int, default=8000, help="gateway port (default 8000; 0 picks a free one)"
    )
    demo.add_argument("--servers", type=int, default=2, help="simulated SGLang servers (default 2)")
    demo.add_argument("--dp-size", type=int, default=4, help="DP attention ranks per server (default 4)")
    demo.add_argument(
        "--preset", default="h200-dp8", help="hardware preset of the simulator (default h200-dp8)"
    )
    demo.add_argument(
        "--time-scale",
        type=float,
        default=0.05,
        help="real seconds per simulated second: each modelled GPU step sleeps its duration times "
        "this (default 0.05: 20x faster than the hardware; 1 = real time)",
    )
    demo.add_argument("--policy", default=None, help=f"routing policy: {', '.join(policy_names())}")
    demo.add_argument(
        "--pd",
        action="store_true",
        help="PD disaggregation: --servers prefill and --servers decode servers instead of regular ones",
    )
    return parser


_FLAG_FIELDS = (
    "host",
    "port",
    "processes",
    "policy",
    "redis_url",
    "seed",
    "max_body_bytes",
    "retries",
    "connect_timeout_s",
    "read_timeout_s",
    "health_interval_s",
    "load_interval_s",
    "pd_direct_below_tokens",
    "pd_fallback_to_regular",
    "pd_prefill_timeout_s",
    "transport",
    "otlp_endpoint",
    "admin_token",
    "log_level",
)


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> GatewayConfig:
    overrides: dict[str, Any] = {name: getattr(args, name) for name in _FLAG_FIELDS}
    overrides["workers"] = args.upstreams
    overrides["models"] = args.models
    return load_config(args.config, env=dict(os.environ) if env is None else env, overrides=overrides)


class _Stopped(Exception):
    """SIGTERM arrived and the server has shut down gracefully."""


def _stopped(_signum: int, _frame: object) -> None:
    raise _Stopped


def serve(config: GatewayConfig) -> None:
    """Run the gateway until interrupted (uvicorn; several processes if config.processes > 1).

    uvicorn shuts down gracefully on SIGTERM and then re-raises the signal; it lands in ``_stopped``
    so a requested stop exits 0 rather than "killed by signal".
    """
    signal.signal(signal.SIGTERM, _stopped)
    import uvicorn  # noqa: PLC0415 - only the serving path needs it

    from gateway.app import (  # noqa: PLC0415
        RESOLVED_CONFIG_ENV,
        Gateway,
        configure_logging,
        create_app,
        tune_gc_for_serving,
    )

    configure_logging(config.log_level)
    if config.processes > 1 and config.redis_url is None:
        logging.getLogger("cachet.gateway").warning(
            "%d processes without --redis-url: each keeps its own routing state (prefix index, loads)",
            config.processes,
        )
    common: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        "log_level": config.log_level,
        "server_header": False,
        "backlog": 4096,
        "timeout_graceful_shutdown": 10,
    }
    if config.processes == 1:
        app = create_app(Gateway.from_config(config))
        tune_gc_for_serving()
        uvicorn.run(app, **common)
        return
    import msgspec  # noqa: PLC0415

    from gateway.metrics import METRICS_DIR_ENV  # noqa: PLC0415

    os.environ[RESOLVED_CONFIG_ENV] = msgspec.json.encode(config).decode()
    # The processes add up their metrics through snapshots in a directory of this run's own.
    metrics_dir = tempfile.mkdtemp(prefix="cachet-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    try:
        uvicorn.run("gateway.app:app_from_environment", factory=True, workers=config.processes, **common)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            serve(config_from_args(args))
            return 0
        if args.command == "demo":
            from gateway.demo import run_demo  # noqa: PLC0415

            return run_demo(
                host=args.host,
                port=args.port,
                servers=args.servers,
                dp_size=args.dp_size,
                preset=args.preset,
                time_scale=args.time_scale,
                policy=args.policy,
                pd=args.pd,
            )
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except _Stopped:
        return 0
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2
