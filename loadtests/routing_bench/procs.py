"""The processes a routing benchmark runs: the simulated cluster, gateways, peer routers, Redis.

Every process binds 127.0.0.1 on a free port, is started in its own process group and stopped with
SIGTERM (then SIGKILL) by the context that started it; nothing else is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import msgspec

from loadtests.peers import PeerKind, PeerSpec, run_peer

__all__ = [
    "Proc",
    "SimServer",
    "existing_servers",
    "flush_caches",
    "free_port",
    "run_gateway",
    "run_peer_router",
    "run_redis",
    "run_sim_cluster",
]

READY_PREFIX = "CACHET-SIM-READY "


class SimServer(msgspec.Struct, frozen=True):
    url: str
    role: str
    dp_size: int
    model: str
    bootstrap_port: int | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, *, stdout_pipe: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5.0)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def _wait_http(url: str, proc: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2.0)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready at {url} within {timeout_s}s:\n{proc.tail()}")


@contextlib.asynccontextmanager
async def run_sim_cluster(
    log_dir: Path, *, servers: int, dp_size: int, time_scale: float, extra: Sequence[str] = ()
) -> AsyncIterator[list[SimServer]]:
    argv = [
        sys.executable, "-m", "backends.sim", "cluster", "--servers", str(servers), "--dp-size", str(dp_size),
        "--time-scale", str(time_scale), "--base-port", "0", "--enable-cache-report", "--enable-metrics",
        *extra,
    ]  # fmt: skip
    proc = Proc("sim-cluster", argv, log_dir, stdout_pipe=True)
    try:
        assert proc.popen.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(_read_ready, proc), timeout=120.0)
        info = json.loads(line[len(READY_PREFIX) :])
        yield [msgspec.convert(s, SimServer) for s in info["servers"]]
    finally:
        proc.stop()


def _read_ready(proc: Proc) -> str:
    assert proc.popen.stdout is not None
    for raw in proc.popen.stdout:
        line = raw.decode(errors="replace").strip()
        if line.startswith(READY_PREFIX):
            return line
    raise RuntimeError(f"simulated cluster exited before it was ready:\n{proc.tail()}")


@contextlib.asynccontextmanager
async def run_gateway(
    log_dir: Path, worker_urls: Sequence[str], *, policy: str, name: str, redis_url: str | None = None,
    seed: int | None = None,
) -> AsyncIterator[str]:  # fmt: skip
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--policy", policy, "--log-level", "warning"]  # fmt: skip
    for url in worker_urls:
        argv += ["--worker", url]
    if redis_url is not None:
        argv += ["--redis-url", redis_url]
    if seed is not None:
        argv += ["--seed", str(seed)]
    proc = Proc(name, argv, log_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_http(base + "/readiness", proc, 60.0)
        yield base
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def run_peer_router(
    log_dir: Path, kind: PeerKind, worker_urls: Sequence[str], *, dp_size: int
) -> AsyncIterator[str]:
    """sglang-router / vllm-router with cache_aware over the DP ranks (through loadtests.peers)."""
    spec = PeerSpec(
        kind=kind,
        worker_urls=tuple(worker_urls),
        policy="cache_aware",
        dp_aware=dp_size > 1,
        intra_node_dp_size=dp_size if dp_size > 1 else None,
    )
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - one local mkdir before a subprocess starts
    async with run_peer(spec, log_dir=str(log_dir)) as peer:
        yield peer.url


@contextlib.asynccontextmanager
async def run_redis(log_dir: Path) -> AsyncIterator[str]:
    port = free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = Proc("redis", argv, log_dir)
    try:
        deadline = time.monotonic() + 15.0
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
                break
            if time.monotonic() > deadline or proc.popen.poll() is not None:
                raise RuntimeError(f"redis-server did not start:\n{proc.tail()}")
            await asyncio.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def existing_servers(urls: Sequence[str]) -> AsyncIterator[list[SimServer]]:
    """Servers someone else runs (real SGLang or a simulator): model from /v1/models, DP size from
    /server_info (or /get_server_info on old versions)."""
    servers = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
        for given in urls:
            url = given.rstrip("/")
            async with session.get(url + "/v1/models") as response:
                models = await response.json()
            info: dict[str, object] = {}
            for path in ("/server_info", "/get_server_info"):
                async with session.get(url + path) as response:
                    if response.status == 200:
                        info = await response.json()
                        break
            dp_size = info.get("dp_size")
            servers.append(
                SimServer(
                    url=url,
                    role="regular",
                    dp_size=dp_size if isinstance(dp_size, int) and dp_size > 0 else 1,
                    model=str(models["data"][0]["id"]),
                )
            )
    yield servers


async def flush_caches(server_urls: Sequence[str]) -> None:
    """POST /flush_cache on every server (SGLang answers 200 when the cache was empty enough)."""
    async with aiohttp.ClientSession() as session:
        for url in server_urls:
            for _ in range(50):
                async with session.post(url + "/flush_cache", timeout=aiohttp.ClientTimeout(total=10.0)) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"{url} refused /flush_cache (requests still running?)")
