"""Upstream transports side by side: httpx vs httpx2 vs aiohttp under 256 concurrent streams.

Each (transport, mode) measurement runs in its own fresh process against one shared trivial
upstream, and the transports take turns round by round so drift hits them alike. Reported: requests
per second of the client process and per-request latency percentiles, plus each transport's ratio
to the best.

    python -m loadtests.overhead.transports [--requests 20000] [--concurrency 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

import msgspec

from gateway.upstream import TRANSPORT_NAMES, UpstreamError, UpstreamRequest, make_transport
from loadtests.overhead._upstream import trivial_upstream


class Measurement(msgspec.Struct):
    transport: str
    stream: bool
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    bytes_per_request: int
    errors: int


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(int(q * len(sorted_values)), len(sorted_values) - 1)
    return sorted_values[index]


async def _measure(name: str, url: str, stream: bool, requests: int, concurrency: int) -> Measurement:
    transport = make_transport(
        name, max_connections=concurrency, connect_timeout=5.0, read_timeout=30.0, keepalive_expiry=4.0
    )
    body = json.dumps({"model": "trivial", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    request = UpstreamRequest(
        "POST",
        url + "/v1/chat/completions",
        [("content-type", "application/json")],
        body.encode(),
    )
    latencies: list[float] = []
    sizes: list[int] = []
    errors = 0
    remaining = requests

    async def one() -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            await exchange(started)
        except UpstreamError:
            errors += 1

    async def exchange(started: float) -> None:
        response = await transport.send(request)
        size = 0
        try:
            async for chunk in response.aiter_raw():
                size += len(chunk)
        finally:
            await response.aclose()
        if response.status != 200:
            raise RuntimeError(f"upstream answered {response.status}")
        latencies.append(time.perf_counter() - started)
        sizes.append(size)

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    # Warm-up: open the pool's connections before the clock starts.
    remaining = concurrency
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.clear()
    sizes.clear()
    remaining = requests
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await transport.aclose()
    latencies.sort()
    return Measurement(
        transport=name,
        stream=stream,
        requests=requests,
        seconds=elapsed,
        rps=requests / elapsed,
        p50_ms=_percentile(latencies, 0.5) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        bytes_per_request=int(statistics.mean(sizes)),
        errors=errors,
    )


def _run_one(args: argparse.Namespace) -> None:
    import uvloop  # noqa: PLC0415

    result = uvloop.run(_measure(args.one, args.url, args.stream, args.requests, args.concurrency))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")


async def _child(args: argparse.Namespace, url: str, name: str, stream: bool) -> Measurement:
    cmd = [
        sys.executable,
        "-m",
        "loadtests.overhead.transports",
        "--one",
        name,
        "--url",
        url,
        "--requests",
        str(args.requests),
        "--concurrency",
        str(args.concurrency),
    ]
    if stream:
        cmd.append("--stream")
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} run failed ({proc.returncode})")
    return msgspec.json.decode(out.strip().splitlines()[-1], type=Measurement)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc), {model}, Python {platform.python_version()}, {platform.system()}"


async def _compare(args: argparse.Namespace) -> None:
    names = args.transports
    results: dict[tuple[str, bool], list[Measurement]] = {}
    # Idle connections stay open long: an overloaded client may pick up a pooled connection just
    # before SGLang's 5 s idle limit and write on it after, which measures CPU starvation, not speed.
    async with trivial_upstream(chunks=args.chunks, idle_timeout_s=300.0) as url:
        for _round in range(args.rounds):
            for stream in (True, False):
                for name in names:
                    m = await _child(args, url, name, stream)
                    results.setdefault((name, stream), []).append(m)
    print(f"machine: {machine()}")
    print(
        f"requests {args.requests} per run, concurrency {args.concurrency}, {args.chunks} SSE events per "
        f"streamed response, {args.rounds} rounds (median run shown)"
    )
    for stream in (True, False):
        rows = []
        for name in names:
            runs = sorted(results[(name, stream)], key=lambda m: m.rps)
            rows.append(runs[len(runs) // 2])
        best = max(r.rps for r in rows)
        print(f"\n{'streaming' if stream else 'non-streaming'}:")
        print("| transport | req/s | ratio to best | p50 ms | p99 ms | all runs req/s | failed requests |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            every = ", ".join(f"{m.rps:.0f}" for m in results[(row.transport, stream)])
            print(
                f"| {row.transport} | {row.rps:.0f} | {row.rps / best:.2f} | {row.p50_ms:.1f} | "
                f"{row.p99_ms:.1f} | {every} | {sum(m.errors for m in results[(row.transport, stream)])} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORT_NAMES), choices=TRANSPORT_NAMES)
    parser.add_argument("--one", choices=TRANSPORT_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _run_one(args)
    else:
        asyncio.run(_compare(args))


if __name__ == "__main__":
    main()
