"""What a router adds on top of the upstream: Cachet's gateway vs direct access vs the Rust peers.

One run, one trivial upstream (answers at once), every target side by side: direct, the gateway
with 1 and 2 processes (``python -m gateway serve --worker URL --policy round_robin``),
sglang-router 0.3.2 and vllm-router 0.1.17 (both round_robin). Load comes from wrk (one thread, a
Lua script that POSTs a chat completion), streaming and not, at 1 and 32 connections; targets
take turns round by round. Reported per cell: requests/s, latency p50/p99, and what each target
adds over direct access (median of the rounds).

    python -m loadtests.overhead.bench [--duration 8] [--rounds 3] [--connections 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec

from loadtests.overhead._upstream import trivial_upstream
from loadtests.overhead.transports import machine
from loadtests.peers import PeerSpec, free_port, run_peer

TARGETS = ("direct", "gateway-1", "gateway-2", "sglang-router", "vllm-router")
_GATEWAY_TARGET = re.compile(r"gateway-(\d+)(?:-(\w+))?")


def parse_gateway_target(target: str) -> tuple[int, str | None]:
    """``gateway-N`` or ``gateway-N-TRANSPORT`` -> (processes, transport or None for the default)."""
    match = _GATEWAY_TARGET.fullmatch(target)
    if match is None:
        raise ValueError(f"bad gateway target {target!r}; use gateway-N or gateway-N-TRANSPORT")
    return int(match[1]), match[2]


PATH = "/v1/chat/completions"


class Cell(msgspec.Struct):
    target: str
    stream: bool
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def lua_script(stream: bool) -> str:
    body = (
        '{"model":"trivial","messages":[{"role":"user","content":"Say hi"}],'
        f'"max_tokens":16,"stream":{"true" if stream else "false"}}}'
    )
    return f'wrk.method = "POST"\nwrk.body = \'{body}\'\nwrk.headers["Content-Type"] = "application/json"\n'


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"unparseable wrk latency {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(output: str) -> tuple[float, float, float, int]:
    """(req/s, p50 ms, p99 ms, errors) from ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M)[1])  # type: ignore[index]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M)[1])  # type: ignore[index]
    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx[1])
    return rps, p50, p99, errors


async def run_wrk(
    url: str, script: str, connections: int, duration_s: int
) -> tuple[float, float, float, int]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "-s", script, url + PATH]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {err.decode()}")
    return parse_wrk(out.decode())


@contextlib.asynccontextmanager
async def run_gateway(
    upstream: str, processes: int, log_dir: str, transport: str | None = None
) -> AsyncIterator[str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker",
        upstream,
        "--policy",
        "round_robin",
        "--workers",
        str(processes),
        "--log-level",
        "warning",
    ]
    if transport is not None:
        cmd += ["--transport", transport]
    log_path = os.path.join(log_dir, f"gateway-{processes}-{port}.log")
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - a local log file
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=log, stderr=asyncio.subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"gateway exited ({proc.returncode}); see {log_path}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url + "/readiness") as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway not ready; see {log_path}")
                await asyncio.sleep(0.1)
        print(f"# gateway ({processes} process(es)): {' '.join(cmd)}", flush=True)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _bench(args: argparse.Namespace) -> None:
    log_dir = tempfile.mkdtemp(prefix="cachet-overhead-")
    scripts = {}
    for stream in (True, False):
        path = os.path.join(log_dir, f"post-{'stream' if stream else 'json'}.lua")
        with open(path, "w") as f:  # noqa: ASYNC230 - a local temp file
            f.write(lua_script(stream))
        scripts[stream] = path
    cells: dict[tuple[str, bool, int], list[Cell]] = {}
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(trivial_upstream(chunks=args.chunks))
        urls: dict[str, str] = {}
        for target in args.targets:
            if target == "direct":
                urls[target] = upstream
            elif target.startswith("gateway-"):
                processes, transport = parse_gateway_target(target)
                urls[target] = await stack.enter_async_context(
                    run_gateway(upstream, processes, log_dir, transport)
                )
            else:
                spec = PeerSpec(kind=target, worker_urls=(upstream,), policy="round_robin")
                peer = await stack.enter_async_context(run_peer(spec, log_dir))
                print(f"# {target}: {' '.join(peer.command)}", flush=True)
                urls[target] = peer.url
        # Warm every target (connection pools, allocators) before measuring.
        for url in urls.values():
            await run_wrk(url, scripts[True], 8, 1)
        for round_index in range(args.rounds):
            for stream in (True, False):
                for connections in args.connections:
                    for target in args.targets:
                        rps, p50, p99, errors = await run_wrk(
                            urls[target], scripts[stream], connections, args.duration
                        )
                        cell = Cell(target, stream, connections, rps, p50, p99, errors)
                        cells.setdefault((target, stream, connections), []).append(cell)
                        print(
                            f"# round {round_index} {target} stream={stream} c={connections}: "
                            f"{rps:.0f} req/s p50 {p50:.2f} ms p99 {p99:.2f} ms errors {errors}",
                            flush=True,
                        )
    report(args, cells)


def _median(cells: list[Cell], field: str) -> float:
    return float(statistics.median(float(getattr(c, field)) for c in cells))


def report(args: argparse.Namespace, cells: dict[tuple[str, bool, int], list[Cell]]) -> None:
    print(f"\nmachine: {machine()}")
    print(
        f"wrk -t1 -d{args.duration}s --latency, {args.chunks} SSE events per streamed response, "
        f"median of {args.rounds} rounds"
    )
    for stream in (True, False):
        for connections in args.connections:
            print(f"\n{'streaming' if stream else 'non-streaming'}, {connections} connection(s):")
            print("| target | req/s | vs direct | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |")
            print("|---|---|---|---|---|---|---|---|")
            direct = cells.get(("direct", stream, connections))
            base_rps = _median(direct, "rps") if direct else None
            base_p50 = _median(direct, "p50_ms") if direct else None
            base_p99 = _median(direct, "p99_ms") if direct else None
            for target in args.targets:
                runs = cells[(target, stream, connections)]
                rps, p50, p99 = _median(runs, "rps"), _median(runs, "p50_ms"), _median(runs, "p99_ms")
                errors = sum(c.errors for c in runs)
                vs = f"{rps / base_rps:.2f}" if base_rps else "-"
                added50 = f"{p50 - base_p50:+.2f}" if base_p50 is not None else "-"
                added99 = f"{p99 - base_p99:+.2f}" if base_p99 is not None else "-"
                row = [target, f"{rps:.0f}", vs, f"{p50:.2f}", f"{p99:.2f}", added50, added99, str(errors)]
                print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(TARGETS),
        help="direct, gateway-N[-TRANSPORT] (N processes, e.g. gateway-2-httptools), sglang-router, "
        "vllm-router",
    )
    args = parser.parse_args()
    for target in args.targets:
        if target not in ("direct", "sglang-router", "vllm-router"):
            parse_gateway_target(target)
    asyncio.run(_bench(args))


if __name__ == "__main__":
    main()
