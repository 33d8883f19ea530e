"""`python -m backends.sim serve|cluster` — SGLang look-alike servers for tests, demos and benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

from backends.sim.cluster import ClusterSpec, SimCluster
from backends.sim.settings import DEFAULT_MODEL_PATH, LOAD_BALANCE_METHODS, Faults, ServerSettings


def _common(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--dp-size", type=int, default=None, help="DP attention ranks (default: the preset's)")
    add("--preset", default="h200-tp8", help="hardware preset of the engine (h200-tp8, h200-dp8, h20-tp16)")
    add("--mtp", action="store_true", help="MTP speculative decoding")
    add(
        "--time-scale", type=float, default=1.0, help="real seconds per simulated second (0.01 = 100x faster)"
    )
    add("--enable-cache-report", action="store_true")
    add("--enable-metrics", action="store_true")
    add("--model-path", default=DEFAULT_MODEL_PATH)
    add("--served-model-name", default=None)
    add("--sglang-version", default=None, help="e.g. 0.5.9 or a date 2026-03-01 (default: newest)")
    add("--page-size", type=int, default=1)
    add("--max-running-requests", type=int, default=None)
    add("--max-total-tokens", type=int, default=None)
    add("--chunked-prefill-size", type=int, default=None)
    add("--max-prefill-tokens", type=int, default=None)
    add("--disable-radix-cache", action="store_true")
    add(
        "--load-balance-method",
        choices=LOAD_BALANCE_METHODS,
        default="auto",
        help="DP rank choice when unpinned",
    )
    add("--context-length", type=int, default=163840)
    add("--rtt-ms", type=float, default=None, help="network RTT between the nodes of one TP group")
    add("--api-key", default=None)
    add("--incremental-streaming-output", "--stream-output", action="store_true", dest="incremental")
    add("--stream-interval", type=int, default=1)
    add("--stream-response-default-include-usage", action="store_true")
    add(
        "--disaggregation-bootstrap-timeout",
        type=float,
        default=None,
        help="s (SGLANG_..._BOOTSTRAP_TIMEOUT)",
    )
    add("--disaggregation-waiting-timeout", type=float, default=None, help="s (SGLANG_..._WAITING_TIMEOUT)")
    add("--health-check-timeout", type=float, default=None)
    add("--startup-delay", type=float, default=0.0, help="seconds /health answers 503 before warm-up")
    add("--seed", type=int, default=0)
    add("--fault-latency-ms", type=float, default=0.0)
    add("--fault-error-rate", type=float, default=0.0)
    add("--fault-hang", action="store_true")
    add("--fault-drop-after-chunks", type=int, default=None)
    add("--fault-slowdown", type=float, default=1.0)
    add(
        "--fault-refuse-connections",
        action="store_true",
        help="start refusing connections (see --fault-refuse-for-s)",
    )
    add("--fault-refuse-for-s", type=float, default=0.0, help="listen again after this long (0: never)")
    add("--fault-reset-connections", action="store_true", help="accept connections and reset them at once")


def _settings(args: argparse.Namespace, **overrides: object) -> ServerSettings:
    base = ServerSettings()
    values: dict[str, object] = {
        "host": args.host,
        "dp_size": args.dp_size,
        "preset": args.preset,
        "mtp": args.mtp,
        "time_scale": args.time_scale,
        "enable_cache_report": args.enable_cache_report,
        "enable_metrics": args.enable_metrics,
        "model_path": args.model_path,
        "served_model_name": args.served_model_name,
        "sglang_version": args.sglang_version,
        "page_size": args.page_size,
        "max_running_requests": args.max_running_requests,
        "max_total_num_tokens": args.max_total_tokens,
        "chunked_prefill_size": args.chunked_prefill_size,
        "max_prefill_tokens": args.max_prefill_tokens,
        "disable_radix_cache": args.disable_radix_cache,
        "load_balance_method": args.load_balance_method,
        "context_length": args.context_length,
        "rtt_ms": args.rtt_ms,
        "api_key": args.api_key,
        "incremental_streaming_output": args.incremental,
        "stream_interval": args.stream_interval,
        "stream_response_default_include_usage": args.stream_response_default_include_usage,
        "bootstrap_timeout_s": args.disaggregation_bootstrap_timeout or base.bootstrap_timeout_s,
        "waiting_timeout_s": args.disaggregation_waiting_timeout or base.waiting_timeout_s,
        "health_check_timeout_s": args.health_check_timeout or base.health_check_timeout_s,
        "startup_delay_s": args.startup_delay,
        "seed": args.seed,
        **overrides,
    }
    return ServerSettings(**values)  # type: ignore[arg-type]


def _faults(args: argparse.Namespace) -> Faults:
    faults = Faults(
        latency_ms=args.fault_latency_ms,
        error_rate=args.fault_error_rate,
        hang=args.fault_hang,
        drop_after_chunks=args.fault_drop_after_chunks,
        slowdown=args.fault_slowdown,
        refuse_connections=args.fault_refuse_connections,
        refuse_for_s=args.fault_refuse_for_s,
        reset_connections=args.fault_reset_connections,
    )
    faults.validate()
    return faults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backends.sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="one server")
    serve.add_argument("--port", type=int, default=30000)
    serve.add_argument("--disaggregation-mode", choices=("null", "prefill", "decode"), default="null")
    serve.add_argument("--disaggregation-bootstrap-port", type=int, default=8998)
    _common(serve)
    cluster = sub.add_parser("cluster", help="several servers in one process")
    cluster.add_argument("--servers", type=int, default=1, help="regular (non-PD) servers")
    cluster.add_argument("--prefill", type=int, default=0)
    cluster.add_argument("--decode", type=int, default=0)
    cluster.add_argument("--prefill-dp-size", type=int, default=None, help="default: --dp-size")
    cluster.add_argument("--decode-dp-size", type=int, default=None, help="default: --dp-size")
    cluster.add_argument("--base-port", type=int, default=0, help="first port (0: any free ports)")
    cluster.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this one dies (even by SIGKILL): no orphaned cluster",
    )
    _common(cluster)
    return parser


async def _run(args: argparse.Namespace) -> None:
    if args.command == "serve":
        settings = _settings(
            args,
            port=args.port,
            disaggregation_mode=args.disaggregation_mode,
            disaggregation_bootstrap_port=args.disaggregation_bootstrap_port,
        )
        spec = ClusterSpec(servers=0, custom=(settings,), faults=_faults(args))
    else:
        spec = ClusterSpec(
            servers=args.servers,
            prefill=args.prefill,
            decode=args.decode,
            base=_settings(args),
            base_port=args.base_port,
            faults=_faults(args),
            prefill_dp_size=args.prefill_dp_size,
            decode_dp_size=args.decode_dp_size,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    watcher = (
        loop.create_task(_stop_when_orphaned(os.getppid(), stop))
        if getattr(args, "exit_with_parent", False)
        else None
    )
    try:
        async with SimCluster(spec) as cluster:
            print(cluster.ready_line(), flush=True)
            await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()


_PARENT_CHECK_INTERVAL_S = 1.0


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    # A parent killed outright (SIGKILL, OOM) sends no signal on its way out; once it is gone this
    # process is re-parented (to init or a subreaper), which getppid() shows. Polling works on every
    # POSIX system, unlike Linux's PR_SET_PDEATHSIG.
    while True:
        if os.getppid() != parent:
            stop.set()
            return
        await asyncio.sleep(_PARENT_CHECK_INTERVAL_S)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms

        uvloop.run(_run(args))
    except ImportError:
        asyncio.run(_run(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
