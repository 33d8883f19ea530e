"""PD benchmark, side by side in one run on the simulated DeepSeek-V3 cluster:

1. regular serving: N regular servers behind Cachet (prefix_aware) and behind sglang-router 0.3.2
   (cache_aware);
2. PD serving at the same GPU count: N/2 prefill + N/2 decode servers behind Cachet PD
   (prefix_aware prefill, decode_load decode) and behind sglang-router 0.3.2
   ``--pd-disaggregation`` (cache_aware).

Every system gets the same open-loop workload (SGLang's generated-shared-prefix, Poisson arrivals,
streamed chat, ``ignore_eos`` so every system generates the same tokens); caches are flushed
between systems. Client-side TTFT, TPOT and output throughput are reported in real seconds; with
``--time-scale 1`` (the default) the simulator runs in real time, so router overheads are not
magnified.

    python -m loadtests.pd.bench --nodes 4 --rate 6 --groups 12 --prompts-per-group 16 \
        --out docs/bench-pd-results.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from loadtests.peers import PeerSpec, run_peer
from loadtests.routing_bench.client import HttpRecord, run_open_loop
from loadtests.routing_bench.procs import Proc, SimServer, flush_caches, free_port, run_sim_cluster
from loadtests.stats import percentile
from loadtests.workloads.request import BenchRequest
from loadtests.workloads.shared_prefix import generated_shared_prefix

MODEL = "deepseek-ai/DeepSeek-V3"
_PD_SYSTEMS = frozenset({"cachet-pd", "cachet-pd-direct", "sglang-router-pd"})


@contextlib.asynccontextmanager
async def run_cachet(
    log_dir: Path,
    *,
    regular: Sequence[str],
    prefill: Sequence[SimServer],
    decode: Sequence[str],
    direct_below: int,
) -> AsyncIterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "loadtests.pd.gateway", "--port", str(port), "--seed", "1"]
    for url in regular:
        argv += ["--worker", url]
    for server in prefill:
        argv += ["--prefill", server.url, str(server.bootstrap_port)]
    for url in decode:
        argv += ["--decode", url]
    if direct_below:
        argv += ["--direct-below", str(direct_below)]
    proc = Proc("cachet-pd" if prefill else "cachet", argv, log_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(base, proc, expected=len(regular) + len(prefill) + len(decode))
        yield base
    finally:
        proc.stop()


async def _wait_ready(base: str, proc: Proc, *, expected: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(base + "/readiness", timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready at {base}:\n{proc.tail()}")


def summarise(name: str, records: list[HttpRecord], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.status == 200]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    e2e = [r.finish_s - r.arrival_s for r in ok if r.finish_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)

    def ms(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value * 1000.0, 1)

    return {
        "system": name,
        "requests": len(records),
        "ok": len(ok),
        "errors": sorted({(r.status, (r.error or "")[:120]) for r in records if r not in ok})[:5],
        "ttft_ms": {"p50": ms(ttft, 50), "p90": ms(ttft, 90), "p99": ms(ttft, 99)},
        "tpot_ms": {"p50": ms(tpot, 50), "p90": ms(tpot, 90), "p99": ms(tpot, 99)},
        "e2e_ms": {"p50": ms(e2e, 50), "p90": ms(e2e, 90)},
        "output_tok_per_s": round(tokens / wall_s, 1) if wall_s > 0 else None,
        "cache_hit": round(cached / prompt, 3) if prompt else None,
        "wall_s": round(wall_s, 2),
    }


async def measure(name: str, entry: str, workload: list[BenchRequest], timeout_s: float) -> dict[str, Any]:
    began = time.perf_counter()
    records = await run_open_loop(workload, [entry], model=MODEL, timeout_s=timeout_s)
    wall = time.perf_counter() - began
    result = summarise(name, records, wall)
    print(json.dumps(result), flush=True)
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="cachet-bench-pd-"))
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything starts
    workload = generated_shared_prefix(
        groups=args.groups,
        prompts_per_group=args.prompts_per_group,
        system_tokens=args.system_tokens,
        question_tokens=args.question_tokens,
        output_tokens=args.output_tokens,
        rate_per_s=args.rate,
        seed=args.seed,
    )
    results: list[dict[str, Any]] = []
    common = ["--preset", args.preset, "--max-running-requests", str(args.max_running)]
    systems = set(args.systems.split(","))
    if systems & {"cachet", "sglang-router"}:
        async with run_sim_cluster(
            log_dir, servers=args.nodes, dp_size=1, time_scale=args.time_scale, extra=common
        ) as servers:
            urls = [s.url for s in servers]
            if "cachet" in systems:
                await flush_caches(urls)
                async with run_cachet(log_dir, regular=urls, prefill=[], decode=[], direct_below=0) as entry:
                    results.append(
                        await measure(f"Cachet regular ({args.nodes} nodes)", entry, workload, args.timeout)
                    )
            if "sglang-router" in systems:
                await flush_caches(urls)
                spec = PeerSpec(kind="sglang-router", worker_urls=tuple(urls), policy="cache_aware")
                async with run_peer(spec, log_dir=str(log_dir)) as peer:
                    results.append(
                        await measure(
                            f"sglang-router regular ({args.nodes} nodes)", peer.url, workload, args.timeout
                        )
                    )
    pd_systems = [name for name in args.systems.split(",") if name in _PD_SYSTEMS]
    if pd_systems:
        half = args.prefill_nodes if args.prefill_nodes is not None else args.nodes // 2
        if not 0 < half < args.nodes - args.mixed_regular:
            raise SystemExit(
                "--prefill-nodes/--mixed-regular must leave at least one prefill and one decode node"
            )
        decode_nodes = args.nodes - args.mixed_regular - half
        extra = [*common, "--prefill", str(half), "--decode", str(decode_nodes)]
        async with run_sim_cluster(
            log_dir, servers=args.mixed_regular, dp_size=1, time_scale=args.time_scale, extra=extra
        ) as servers:
            prefill = [s for s in servers if s.role == "prefill"]
            decode = [s.url for s in servers if s.role == "decode"]
            regular = [s.url for s in servers if s.role == "regular"]
            urls = [s.url for s in servers]
            label = f"{len(regular)}R+" if regular else ""
            label += f"{len(prefill)}P+{len(decode)}D"
            for name in pd_systems:
                await flush_caches(urls)
                if name in ("cachet-pd", "cachet-pd-direct"):
                    direct = args.direct_below if name == "cachet-pd-direct" else 0
                    title = f"Cachet PD ({label}" + (f", direct below {direct} tok)" if direct else ")")
                    async with run_cachet(
                        log_dir, regular=regular, prefill=prefill, decode=decode, direct_below=direct
                    ) as entry:
                        results.append(await measure(title, entry, workload, args.timeout))
                else:
                    if regular:
                        raise SystemExit(
                            "sglang-router PD mode takes no regular workers; drop --mixed-regular"
                        )
                    spec = PeerSpec(
                        kind="sglang-router",
                        prefill=tuple((s.url, s.bootstrap_port) for s in prefill),
                        decode=tuple(decode),
                        policy="cache_aware",
                    )
                    async with run_peer(spec, log_dir=str(log_dir)) as peer:
                        results.append(
                            await measure(f"sglang-router PD ({label})", peer.url, workload, args.timeout)
                        )
    return {
        "command": "python -m loadtests.pd.bench " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "workload": {
            "kind": "generated-shared-prefix",
            "groups": args.groups,
            "prompts_per_group": args.prompts_per_group,
            "system_tokens": args.system_tokens,
            "question_tokens": args.question_tokens,
            "output_tokens": args.output_tokens,
            "rate_per_s": args.rate,
            "requests": len(workload),
        },
        "cluster": {"nodes": args.nodes, "preset": args.preset, "time_scale": args.time_scale},
        "results": results,
        "logs": str(log_dir),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.pd.bench")
    parser.add_argument(
        "--nodes", type=int, default=4, help="simulated 8-GPU nodes (PD: half prefill, half decode)"
    )
    parser.add_argument("--prefill-nodes", type=int, default=None, help="PD: prefill nodes (default: half)")
    parser.add_argument("--mixed-regular", type=int, default=0, help="PD: regular nodes beside the pools")
    parser.add_argument("--direct-below", type=int, default=512, help="cachet-pd-direct: threshold in tokens")
    parser.add_argument("--preset", default="h200-tp8")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--max-running", type=int, default=128)
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--prompts-per-group", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=2048)
    parser.add_argument("--question-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--rate", type=float, default=6.0, help="requests per second (Poisson)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--systems",
        default="cachet,sglang-router,cachet-pd,sglang-router-pd",
        help="comma-separated, in order (PD systems may repeat): cachet, sglang-router, cachet-pd, "
        "cachet-pd-direct, sglang-router-pd",
    )
    parser.add_argument("--log-dir")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
