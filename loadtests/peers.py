"""Running the peer routers (sglang-router 0.3.2, vllm-router 0.1.17) beside Cachet for benchmarks.

Both are Rust routers shipped in Python wheels; each is started as a subprocess bound to
127.0.0.1 on free ports (its metrics endpoint too), given worker URLs and a policy, and awaited
until its /readiness answers 200 (it has found its workers healthy).

    async with run_peer(PeerSpec(kind="sglang-router", worker_urls=[url], policy="round_robin")) as peer:
        ... send traffic to peer.url ...

DP ranks: ``dp_aware=True`` gives sglang-router ``--dp-aware`` (it reads dp_size from each worker's
/server_info and routes to ``url@rank``) and vllm-router ``--intra-node-data-parallel-size``
``intra_node_dp_size``. PD: ``prefill=[(url, bootstrap_port|None), ...]`` and ``decode=[url, ...]``
switch on ``--pd-disaggregation`` (sglang-router) / ``--vllm-pd-disaggregation`` (vllm-router).
Only sglang-router speaks SGLang's PD protocol (``SGLANG_PD_CAPABLE``): vllm-router 0.1.17 sends no
``bootstrap_room`` (SGLang, and the simulator, answer 400 "Disaggregated request received without
bootstrap room id"), and with ``--kv-connector mooncake`` it polls a vLLM-only ``/query`` endpoint.

    python -m loadtests.peers sglang-router --worker http://127.0.0.1:30000 --policy cache_aware
starts one and prints ``PEER-READY <url>`` until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Literal

import aiohttp
import msgspec

PeerKind = Literal["sglang-router", "vllm-router"]
PEER_KINDS: tuple[PeerKind, ...] = ("sglang-router", "vllm-router")
_MODULES: dict[PeerKind, str] = {
    "sglang-router": "sglang_router.launch_router",
    "vllm-router": "vllm_router.launch_router",
}
# Policy names each peer accepts (from their --help).
POLICIES: dict[PeerKind, frozenset[str]] = {
    "sglang-router": frozenset({"random", "round_robin", "cache_aware", "power_of_two", "manual"}),
    "vllm-router": frozenset(
        {
            "random",
            "round_robin",
            "cache_aware",
            "kv_aware",
            "power_of_two",
            "consistent_hash",
            "sticky_least_loaded",
        }
    ),
}

# Whether the peer can drive SGLang prefill/decode servers (checked against the simulator).
SGLANG_PD_CAPABLE: dict[PeerKind, bool] = {"sglang-router": True, "vllm-router": False}


class PeerSpec(msgspec.Struct, frozen=True):
    kind: PeerKind
    worker_urls: tuple[str, ...] = ()
    policy: str = "cache_aware"
    dp_aware: bool = False
    # vllm-router's DP flag takes the size; sglang-router discovers it.
    intra_node_dp_size: int | None = None
    prefill: tuple[tuple[str, int | None], ...] = ()
    decode: tuple[str, ...] = ()
    prefill_policy: str | None = None
    decode_policy: str | None = None
    log_level: str = "warn"
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 60.0


class Peer(msgspec.Struct, frozen=True):
    kind: PeerKind
    url: str
    port: int
    metrics_port: int
    pid: int
    log_path: str
    command: tuple[str, ...]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command_for(spec: PeerSpec, port: int, metrics_port: int) -> list[str]:
    """The exact command line that starts ``spec`` on the given loopback ports."""
    if spec.policy not in POLICIES[spec.kind]:
        raise ValueError(f"{spec.kind} has no policy {spec.policy!r}; it has {sorted(POLICIES[spec.kind])}")
    pd = bool(spec.prefill or spec.decode)
    if pd and not (spec.prefill and spec.decode):
        raise ValueError("PD mode needs at least one prefill and one decode worker")
    if not pd and not spec.worker_urls:
        raise ValueError("give worker_urls, or prefill and decode workers")
    log_level = spec.log_level
    if spec.kind == "vllm-router" and log_level == "warn":
        log_level = "warning"  # vllm-router spells it out
    cmd = [
        sys.executable,
        "-m",
        _MODULES[spec.kind],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
        "--policy",
        spec.policy,
        "--log-level",
        log_level,
        "--worker-startup-timeout-secs",
        str(max(int(spec.startup_timeout_s), 1)),
    ]
    if pd:
        cmd.append("--pd-disaggregation" if spec.kind == "sglang-router" else "--vllm-pd-disaggregation")
        for url, bootstrap_port in spec.prefill:
            cmd += ["--prefill", url, "none" if bootstrap_port is None else str(bootstrap_port)]
        for url in spec.decode:
            cmd += ["--decode", url]
        if spec.prefill_policy:
            cmd += ["--prefill-policy", spec.prefill_policy]
        if spec.decode_policy:
            cmd += ["--decode-policy", spec.decode_policy]
    else:
        cmd += ["--worker-urls", *spec.worker_urls]
    if spec.dp_aware:
        if spec.kind == "sglang-router":
            cmd.append("--dp-aware")
        else:
            if spec.intra_node_dp_size is None:
                raise ValueError("vllm-router needs intra_node_dp_size for DP-aware routing")
            cmd += ["--intra-node-data-parallel-size", str(spec.intra_node_dp_size)]
    cmd += list(spec.extra_args)
    return cmd


async def _ready(url: str, proc: asyncio.subprocess.Process, timeout_s: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"peer exited with {proc.returncode} before ready; log: {_tail(log_path)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url + "/readiness") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer at {url} not ready after {timeout_s}s; log: {_tail(log_path)}")
            await asyncio.sleep(0.1)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


async def _stop(proc: asyncio.subprocess.Process, grace_s: float = 10.0) -> None:
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def run_peer(spec: PeerSpec, log_dir: str | None = None) -> AsyncIterator[Peer]:
    """Start a peer router, wait until it is ready, yield it, and stop it on exit."""
    port, metrics_port = free_port(), free_port()
    cmd = command_for(spec, port, metrics_port)
    directory = log_dir or tempfile.gettempdir()
    log_path = os.path.join(directory, f"{spec.kind}-{port}.log")
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - creating a local log file does not block meaningfully
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await _ready(url, proc, spec.startup_timeout_s, log_path)
        yield Peer(
            kind=spec.kind,
            url=url,
            port=port,
            metrics_port=metrics_port,
            pid=proc.pid,
            log_path=log_path,
            command=tuple(cmd),
        )
    finally:
        await _stop(proc)


async def _main(args: argparse.Namespace) -> None:
    spec = PeerSpec(
        kind=args.kind,
        worker_urls=tuple(args.worker),
        policy=args.policy,
        dp_aware=args.dp_aware,
        intra_node_dp_size=args.intra_node_dp_size,
        log_level=args.log_level,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with run_peer(spec) as peer:
        print(f"PEER-READY {peer.url}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Start a peer router (sglang-router / vllm-router) on loopback."
    )
    parser.add_argument("kind", choices=PEER_KINDS)
    parser.add_argument("--worker", action="append", required=True, help="worker URL (repeatable)")
    parser.add_argument("--policy", default="cache_aware")
    parser.add_argument("--dp-aware", action="store_true")
    parser.add_argument("--intra-node-dp-size", type=int)
    parser.add_argument("--log-level", default="warn")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
