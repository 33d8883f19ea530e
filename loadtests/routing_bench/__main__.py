"""``python -m loadtests.routing_bench``: Cachet's policies and the peer routers, one after another,
in front of the same simulated cluster, with the same open-loop workload.

Systems (``--systems``, comma-separated):
  cachet:<policy>       one gateway with that policy (embedded state)
  cachet-x3:<policy>    three gateways sharing one Redis; the client spreads requests over them
  sglang-router         sglang-router 0.3.2 cache_aware --dp-aware
  sglang-router-x3      three independent sglang-router replicas, requests spread over them
  vllm-router           vllm-router 0.1.17 cache_aware

Caches are flushed on every server between systems. Example (small, ~2 minutes):

    python -m loadtests.routing_bench --workload shared-prefix --groups 8 --prompts-per-group 8 \
        --system-tokens 2048 --question-tokens 64 --output-tokens 32 --load 0.8 --sim-time-scale 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec

from loadtests._provenance import code_state
from loadtests.replay.cluster import ClusterSpec
from loadtests.replay.loop import oracle_hits
from loadtests.replay.report import Summary, markdown_table, summarize
from loadtests.replay.run import add_load_basis_arg, estimate_capacity
from loadtests.routing_bench.client import HttpRecord, run_open_loop
from loadtests.routing_bench.metrics import scrape_counters
from loadtests.routing_bench.procs import (
    SimServer,
    existing_servers,
    flush_caches,
    run_gateway,
    run_peer_router,
    run_redis,
    run_sim_cluster,
)
from loadtests.stats import coefficient_of_variation
from loadtests.workloads.cli import add_workload_args, build_workload, describe
from loadtests.workloads.request import BenchRequest
from loadtests.workloads.text import filler_text

DEFAULT_SYSTEMS = "cachet:prefix_aware,cachet:least_load,cachet:round_robin,sglang-router,vllm-router"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.routing_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_workload_args(parser)
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS)
    parser.add_argument("--worker", action="append", default=[],
                        help="use these running servers (repeatable), not a simulated cluster")  # fmt: skip
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--dp-size", type=int, default=2)
    parser.add_argument("--preset", default="h200-tp8")
    parser.add_argument("--sim-time-scale", dest="sim_time_scale", type=float, default=1.0,
                        help="simulator time scale: real seconds per modelled second")  # fmt: skip
    parser.add_argument("--load", type=float, default=None,
                        help="arrival rate: this fraction of the capacity (--load-basis)")  # fmt: skip
    add_load_basis_arg(parser)
    parser.add_argument("--warmup", type=int, default=24,
                        help="unrelated short requests through each system before its run (then caches "
                             "are flushed): first requests through a fresh process are slow and would "
                             "otherwise be the tail")  # fmt: skip
    parser.add_argument("--max-requests", type=int, default=400, help="cap on requests per system")
    parser.add_argument("--deadline-s", type=float, default=180.0, help="stop sending after this per system")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per-request timeout")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    return parser


@contextlib.asynccontextmanager
async def _system(
    name: str, servers: Sequence[SimServer], log_dir: Path, seed: int
) -> AsyncIterator[list[str]]:
    urls = [s.url for s in servers]
    kind, _, policy = name.partition(":")
    async with contextlib.AsyncExitStack() as stack:
        if kind == "cachet":
            yield [
                await stack.enter_async_context(
                    run_gateway(log_dir, urls, policy=policy, name="cachet", seed=seed)
                )
            ]
        elif kind == "cachet-x3":
            redis_url = await stack.enter_async_context(run_redis(log_dir))
            entries = [
                await stack.enter_async_context(
                    run_gateway(
                        log_dir, urls, policy=policy, name=f"cachet-{i}", redis_url=redis_url, seed=seed + i
                    )
                )
                for i in range(3)
            ]
            yield entries
        elif kind == "sglang-router":
            router = run_peer_router(log_dir, "sglang-router", urls, dp_size=servers[0].dp_size)
            yield [await stack.enter_async_context(router)]
        elif kind == "vllm-router":
            router = run_peer_router(log_dir, "vllm-router", urls, dp_size=servers[0].dp_size)
            yield [await stack.enter_async_context(router)]
        elif kind == "sglang-router-x3":
            dp_size = servers[0].dp_size
            routers = [run_peer_router(log_dir, "sglang-router", urls, dp_size=dp_size) for _ in range(3)]
            yield [await stack.enter_async_context(router) for router in routers]
        else:
            raise SystemExit(f"unknown system {name!r}")


def _warmup_requests(count: int) -> list[BenchRequest]:
    """Short prompts sharing nothing with any workload, 20 ms apart."""
    return [
        BenchRequest(
            rid=f"warmup-{i}",
            arrival_s=0.02 * i,
            max_tokens=4,
            messages=[{"role": "user", "content": filler_text(f"routing-bench-warmup:{i}", 256)}],
        )
        for i in range(count)
    ]


def _server_side(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> tuple[float | None, float | None, dict[str, int]]:
    """Hit rate and per-server request spread from counter deltas."""
    prompt = cached = 0.0
    per_server: dict[str, int] = {}
    for url, counters in after.items():
        base = before.get(url, {})
        prompt += counters.get("sglang:prompt_tokens_total", 0.0) - base.get(
            "sglang:prompt_tokens_total", 0.0
        )
        cached += counters.get("sglang:cached_tokens_total", 0.0) - base.get(
            "sglang:cached_tokens_total", 0.0
        )
        requests = counters.get("sglang:num_requests_total", 0.0) - base.get("sglang:num_requests_total", 0.0)
        per_server[url] = int(requests)
    hit = cached / prompt if prompt > 0 else None
    cv = coefficient_of_variation([float(v) for v in per_server.values()])
    return hit, cv, per_server


async def _main(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    log_dir = args.out / f"bench-{stamp}-logs"
    spec = ClusterSpec(servers=args.servers, dp_size=args.dp_size, preset=args.preset, seed=args.seed)
    capacity_virtual = None
    if args.load is not None:
        sample = list(build_workload(args))[: args.max_requests]
        capacity = await estimate_capacity(sample, spec, basis=args.load_basis)
        capacity_virtual = capacity.rps
        real_rps = args.load * capacity_virtual / max(args.sim_time_scale, 1e-9)
        args.rate = real_rps if args.workload == "shared-prefix" else real_rps / max(args.rounds, 1)
        if args.workload == "mooncake":
            span = max(r.arrival_s for r in sample) - min(r.arrival_s for r in sample)
            args.time_scale *= (len(sample) / max(span, 1e-9)) / real_rps
        print(f"engine-model capacity {capacity.describe()} (modelled time); sending {real_rps:.2f} "
              f"req/s real (sim time scale {args.sim_time_scale})", file=sys.stderr)  # fmt: skip
    requests: list[BenchRequest] = list(build_workload(args))[: args.max_requests]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    summaries: list[Summary] = []
    extra: dict[str, dict[str, object]] = {}
    cluster = (
        existing_servers(args.worker)
        if args.worker
        else run_sim_cluster(
            log_dir, servers=args.servers, dp_size=args.dp_size, time_scale=args.sim_time_scale,
            extra=["--preset", args.preset],
        )
    )  # fmt: skip
    async with cluster as servers:
        urls = [s.url for s in servers]
        model = servers[0].model
        targets = [f"{s.url}@{r}" for s in servers for r in range(s.dp_size)]
        for name in systems:
            try:
                async with _system(name, servers, log_dir, args.seed) as entries:
                    if args.warmup:
                        await run_open_loop(_warmup_requests(args.warmup), entries, model=model,
                                            timeout_s=args.timeout_s)  # fmt: skip
                    await flush_caches(urls)
                    before = await scrape_counters(urls)
                    started = time.perf_counter()
                    records: list[HttpRecord] = await run_open_loop(
                        requests, entries, model=model, timeout_s=args.timeout_s, deadline_s=args.deadline_s
                    )
            except (RuntimeError, TimeoutError) as exc:
                print(f"{name}: could not run: {exc}", file=sys.stderr)
                extra[name] = {"error": str(exc)[:2000]}
                continue
            wall = time.perf_counter() - started
            await asyncio.sleep(0.5)
            after = await scrape_counters(urls)
            hit, server_cv, per_server = _server_side(before, after)
            ok = [r for r in records if r.error is None]
            # The oracle sees every request in the order this run actually sent them.
            workload_by_rid = {r.rid: r for r in requests}
            record_by_rid = {r.rid: r for r in records}
            sent = sorted(records, key=lambda r: r.arrival_s)
            for rid, hit_tokens in oracle_hits(workload_by_rid[r.rid] for r in sent).items():
                record_by_rid[rid].oracle_cached_tokens = hit_tokens
            errors = len(records) - len(ok)
            summary = summarize(name, ok, targets=targets if any(r.target for r in ok) else [], wall_s=wall,
                                errors=errors)  # fmt: skip
            if not any(r.target for r in ok):
                summary.per_target = {}
                summary.spread_cv = server_cv
                summary.spread_unit = "server"
            summaries.append(summary)
            extra[name] = {
                "server_hit_rate": hit,
                "per_server_requests": per_server,
                "server_spread_cv": server_cv,
                "predicted_cached_tokens": sum(r.predicted_cached_tokens or 0 for r in ok)
                if any(r.predicted_cached_tokens is not None for r in ok)
                else None,
                "first_errors": [r.error for r in records if r.error][:5],
                "records": msgspec.to_builtins(sorted(records, key=lambda r: r.arrival_s)),
            }
            print(f"{name}: {len(ok)} ok, {errors} errors, client hit {summary.hit_rate:.1%}, server hit "
                  f"{hit if hit is None else format(hit, '.1%')}", file=sys.stderr)  # fmt: skip
    table = markdown_table(summaries)
    command = "python -m loadtests.routing_bench " + " ".join(sys.argv[1:])
    if args.worker:
        where = f"servers {', '.join(args.worker)}"
    else:
        where = (f"simulated cluster {args.servers} servers × DP {args.dp_size}, preset {args.preset}, "
                 f"sim time scale {args.sim_time_scale} (real s = modelled s × scale)")  # fmt: skip
    header = f"HTTP benchmark on loopback: {describe(args)}; {len(requests)} requests; {where}."
    print(header)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench-{args.workload}-{stamp}"
    payload = {
        "command": command,
        "workload": describe(args),
        "requests": len(requests),
        "capacity_rps_modelled": capacity_virtual,
        "load_basis": args.load_basis if capacity_virtual is not None else None,
        "sim_time_scale": args.sim_time_scale,
        "machine": {
            "node": platform.node(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            # Other work on the machine skews wall-clock latencies; keep the load beside the numbers.
            "loadavg_at_end": os.getloadavg(),
        },
        "code": code_state(),
        "summaries": msgspec.to_builtins(summaries),
        "server_side": extra,
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    stem.with_suffix(".md").write_text(f"{header}\n\n`{command}`\n\n{table}\n")
    print(f"wrote {stem}.json and .md; process logs in {log_dir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
