"""``python -m loadtests.replay``: routers side by side over a workload, in virtual time.

Example (the shared-prefix benchmark at 80% of the cache-aware capacity of 4 servers × DP 2, i.e.
of this workload's saturated throughput when prefix_aware routes it; --load-basis round-robin for
the round-robin one):

    python -m loadtests.replay --workload shared-prefix --groups 32 --prompts-per-group 16 --load 0.8 \
        --policies prefix_aware,least_load,round_robin,sglang_cache_aware
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import msgspec

from loadtests._provenance import code_state
from loadtests.replay.cluster import ClusterSpec
from loadtests.replay.report import markdown_table
from loadtests.replay.run import Capacity, add_load_basis_arg, estimate_capacity, run_policies
from loadtests.workloads.cli import add_workload_args, build_workload, describe

DEFAULT_POLICIES = "prefix_aware,least_load,round_robin,random,sglang_cache_aware"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_workload_args(parser)
    parser.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help="comma-separated Cachet policy names; sglang_cache_aware = re-implementation",
    )
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--dp-size", type=int, default=2)
    parser.add_argument("--preset", default="h200-tp8")
    parser.add_argument("--mtp", action="store_true")
    parser.add_argument(
        "--max-total-num-tokens", type=int, default=None, help="per-rank KV capacity override"
    )
    parser.add_argument(
        "--load",
        type=float,
        default=None,
        help="set the arrival rate to this fraction of the estimated capacity (see --load-basis) "
        "(shared-prefix and multi-round; mooncake: compresses time to reach it)",
    )
    add_load_basis_arg(parser)
    parser.add_argument(
        "--speed-seeds",
        choices=("registry", "measured"),
        default="registry",
        help="routing's per-rank speed seeds: the gateway registry's defaults (as live) or measured "
        "from the engine model",
    )
    parser.add_argument("--max-virtual-s", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    return parser


def _load_text(args: argparse.Namespace, capacity: Capacity | None) -> str:
    if capacity is None:
        return ""
    return (
        f"load {args.load:g} × {capacity.basis} capacity {capacity.rps:.2f} req/s "
        f"(saturated burst under {capacity.policy}); "
    )


async def _main(args: argparse.Namespace) -> int:
    spec = ClusterSpec(
        servers=args.servers,
        dp_size=args.dp_size,
        preset=args.preset,
        mtp=args.mtp,
        max_total_num_tokens=args.max_total_num_tokens,
        seed=args.seed,
        speed_seeds=args.speed_seeds,
    )
    capacity = None
    if args.load is not None:
        sample = list(build_workload(args))
        capacity = await estimate_capacity(sample, spec, basis=args.load_basis)
        target_rps = args.load * capacity.rps
        if args.workload == "shared-prefix":
            args.rate = target_rps
        elif args.workload == "multi-round":
            args.rate = target_rps / max(args.rounds, 1)
        else:
            span = max(r.arrival_s for r in sample) - min(r.arrival_s for r in sample)
            trace_rps = len(sample) / max(span, 1e-9)
            args.time_scale *= trace_rps / target_rps
        print(
            f"estimated capacity {capacity.describe()}; target {target_rps:.2f} req/s",
            file=sys.stderr,
        )
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    started = time.perf_counter()
    summaries = await run_policies(
        lambda: build_workload(args), policies, spec, seed=args.seed, max_virtual_s=args.max_virtual_s
    )
    wall = time.perf_counter() - started
    table = markdown_table(summaries)
    command = "python -m loadtests.replay " + " ".join(sys.argv[1:])
    header = (
        f"Replay (virtual time, engine model `backends.sim.engine`): {describe(args)}; "
        f"{_load_text(args, capacity)}cluster {args.servers} servers × DP {args.dp_size}, "
        f"preset {args.preset}{' +MTP' if args.mtp else ''}, "
        f"speed seeds {args.speed_seeds}. "
        f"sglang_cache_aware(reimpl) is a re-implementation of sglang-router's documented algorithm, "
        f"not the binary."
    )
    print(header)
    print(table)
    print(f"(wall {wall:.1f}s on {platform.node()}, {platform.processor() or platform.machine()})")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    stem = args.out / f"replay-{args.workload}-{stamp}"
    payload = {
        "command": command,
        "workload": describe(args),
        "cluster": msgspec.to_builtins(spec),
        "load": args.load,
        "load_basis": args.load_basis if capacity is not None else None,
        "capacity_rps_estimate": capacity.rps if capacity is not None else None,
        "capacity": msgspec.to_builtins(capacity) if capacity is not None else None,
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
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    stem.with_suffix(".md").write_text(f"{header}\n\n`{command}`\n\n{table}\n")
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
