"""Simulator CPU benchmark: CPU seconds per streamed chunk of one `serve` process under N concurrent streams.

    python -m backends.sim.bench --streams 64 --dp-size 16 --preset h20-tp16 --duration 20

The server runs in its own process (so the load generator's CPU is not counted); its CPU time is read from
/proc before and after the measured window. Each client keeps one streaming /generate (or chat) request in
flight, re-issuing it when it ends, and counts SSE chunks as they arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass

import httpx

from backends.sim.cluster import READY_PREFIX


@dataclass
class BenchResult:
    streams: int
    dp_size: int
    preset: str
    time_scale: float
    endpoint: str
    wall_s: float
    chunks: int
    requests_completed: int
    server_cpu_s: float
    chunks_per_s: float
    server_cpu_us_per_chunk: float
    server_cpu_fraction_of_one_core: float
    machine: str


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def _client(
    http: httpx.AsyncClient, url: str, body: dict[str, object], stop: asyncio.Event, counts: list[int]
) -> None:
    while not stop.is_set():
        async with http.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for raw in r.aiter_raw():
                counts[0] += raw.count(b"data: ")
        counts[1] += 1


async def run(args: argparse.Namespace) -> BenchResult:
    argv = [
        sys.executable,
        "-m",
        "backends.sim",
        "serve",
        "--port",
        "0",
        "--preset",
        args.preset,
        "--dp-size",
        str(args.dp_size),
        "--time-scale",
        str(args.time_scale),
    ]
    server = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        assert server.stdout is not None
        line = await asyncio.wait_for(server.stdout.readline(), 120)
        url = json.loads(line[len(READY_PREFIX) :])["servers"][0]["url"]
        if args.endpoint == "chat":
            path = "/v1/chat/completions"
            body: dict[str, object] = {
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": args.max_new_tokens,
                "ignore_eos": True,
                "stream": True,
            }
        else:
            path = "/generate"
            body = {
                "text": "Tell me a long story.",
                "stream": True,
                "sampling_params": {"max_new_tokens": args.max_new_tokens, "ignore_eos": True},
            }
        limits = httpx.Limits(max_connections=args.streams * 2, max_keepalive_connections=args.streams * 2)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
            stop = asyncio.Event()
            counts = [0, 0]
            tasks = [
                asyncio.create_task(_client(http, path, body, stop, counts)) for _ in range(args.streams)
            ]
            await asyncio.sleep(args.warmup)
            chunks0, done0, cpu0, t0 = counts[0], counts[1], _cpu_seconds(server.pid), time.perf_counter()
            await asyncio.sleep(args.duration)
            chunks1, done1, cpu1, t1 = counts[0], counts[1], _cpu_seconds(server.pid), time.perf_counter()
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        server.send_signal(signal.SIGTERM)
        await server.wait()
    chunks = chunks1 - chunks0
    wall = t1 - t0
    cpu = cpu1 - cpu0
    return BenchResult(
        streams=args.streams,
        dp_size=args.dp_size,
        preset=args.preset,
        time_scale=args.time_scale,
        endpoint=args.endpoint,
        wall_s=round(wall, 2),
        chunks=chunks,
        requests_completed=done1 - done0,
        server_cpu_s=round(cpu, 2),
        chunks_per_s=round(chunks / wall, 1),
        server_cpu_us_per_chunk=round(cpu / chunks * 1e6, 1) if chunks else float("nan"),
        server_cpu_fraction_of_one_core=round(cpu / wall, 3),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--dp-size", type=int, default=16)
    parser.add_argument("--preset", default="h20-tp16")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--endpoint", choices=("generate", "chat"), default="generate")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
