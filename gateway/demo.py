"""``gateway demo``: a simulated DeepSeek cluster behind a gateway, ready to call in seconds.

The cluster is ``python -m backends.sim cluster`` in a child process (several SGLang look-alike
servers with DP attention ranks, running faster than real time); the gateway runs in this process
with embedded state. Ctrl-C, SIGTERM or SIGHUP (the terminal closing) stops both; if this process
is killed outright, the cluster notices its parent is gone and stops itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import time
from typing import Literal

import msgspec

from gateway.config import GatewayConfig, WorkerEntry
from policies.registry import DEFAULT_POLICY

__all__ = ["run_demo"]

_READY_PREFIX = "CACHET-SIM-READY"
_CLUSTER_START_TIMEOUT_S = 60.0
_GATEWAY_READY_TIMEOUT_S = 60.0


class _SimServer(msgspec.Struct):
    url: str
    role: Literal["regular", "prefill", "decode"]
    dp_size: int
    model: str
    bootstrap_port: int | None = None


class _SimReady(msgspec.Struct):
    servers: list[_SimServer]


class DemoError(RuntimeError):
    """The demo could not start; the message says why."""


def _cluster_layout(servers: int, pd: bool) -> list[str]:
    """The cluster's role flags: regular servers, or as many prefill + decode servers (PD pools)."""
    if pd:
        return ["--servers", "0", "--prefill", str(servers), "--decode", str(servers)]
    return ["--servers", str(servers)]


async def _start_cluster(
    servers: int, dp_size: int, preset: str, time_scale: float, pd: bool
) -> tuple[asyncio.subprocess.Process, _SimReady]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backends.sim",
        "cluster",
        *_cluster_layout(servers, pd),
        "--dp-size",
        str(dp_size),
        "--preset",
        preset,
        "--time-scale",
        str(time_scale),
        "--enable-cache-report",
        # Should this process die without stopping it (SIGKILL, OOM), the cluster stops itself.
        "--exit-with-parent",
        stdout=asyncio.subprocess.PIPE,
        # Its own session: the terminal's Ctrl-C reaches the gateway, which then stops the cluster.
        start_new_session=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + _CLUSTER_START_TIMEOUT_S
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DemoError(f"the simulated cluster did not become ready in {_CLUSTER_START_TIMEOUT_S:.0f}s")
        try:
            line = await asyncio.wait_for(process.stdout.readline(), remaining)
        except TimeoutError:
            continue
        if not line:
            code = await process.wait()
            raise DemoError(f"the simulated cluster exited with code {code} before it was ready")
        text = line.decode(errors="replace").strip()
        if text.startswith(_READY_PREFIX):
            return process, msgspec.json.decode(text[len(_READY_PREFIX) :].strip(), type=_SimReady)


async def _drain(stream: asyncio.StreamReader | None) -> None:
    # The cluster's stdout must keep being read or its writes would block once the pipe fills.
    if stream is None:
        return
    while await stream.readline():
        pass


def _stop_cluster(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DemoError(f"port {port} is in use; pick another with --port (0 = any free port)") from None
        raise
    sock.listen(2048)
    return sock


def _speed(time_scale: float) -> str:
    if time_scale == 0:
        return "no waiting at all"
    if time_scale == 1:
        return "real time"
    factor = 1 / time_scale
    return (
        f"{factor:.3g}x faster than the hardware"
        if factor > 1
        else f"{time_scale:.3g}x slower than the hardware"
    )


def _banner(url: str, ready: _SimReady, preset: str, time_scale: float, policy: str) -> str:
    model = ready.servers[0].model
    servers = ", ".join(
        f"{s.url} ({'' if s.role == 'regular' else s.role + ', '}dp {s.dp_size})" for s in ready.servers
    )
    return f"""
Cachet gateway ready at {url}
  in front of a simulated {model} cluster: {servers}
  preset {preset}, time scale {time_scale} (real seconds per simulated second: {_speed(time_scale)}), \
policy {policy}

curl (non-streaming; the x-cachet-* headers are the routing receipt):
  curl -si {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

openai SDK (streaming):
  python3 -c '
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="unused")
stream = client.chat.completions.create(model="{model}", stream=True, max_tokens=32,
    messages=[{{"role": "user", "content": "Hello!"}}])
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()'

Routing decisions: curl -s '{url}/admin/decisions?limit=5'   Workers: curl -s {url}/admin/workers
Press Ctrl-C to stop.
""".strip("\n")


async def _demo(
    *,
    host: str,
    port: int,
    servers: int,
    dp_size: int,
    preset: str,
    time_scale: float,
    policy: str | None,
    pd: bool,
) -> None:
    import uvicorn  # noqa: PLC0415

    from gateway.app import Gateway, configure_logging, create_app  # noqa: PLC0415

    # Warnings (a server going down, Redis...) in the serving format, not as bare messages.
    configure_logging("warning")

    sock = _listen(host, port)
    process, ready = await _start_cluster(servers, dp_size, preset, time_scale, pd)
    drain = asyncio.get_running_loop().create_task(_drain(process.stdout))
    try:
        config = GatewayConfig(
            host=host,
            port=sock.getsockname()[1],
            workers=tuple(
                WorkerEntry(url=s.url, role=s.role, bootstrap_port=s.bootstrap_port, model=s.model)
                for s in ready.servers
            ),
            health_interval_s=2.0,
            load_interval_s=0.5,
            log_level="warning",
            policy=policy or DEFAULT_POLICY,
        )
        gateway = Gateway.from_config(config)
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(gateway),
                http="httptools",
                lifespan="on",
                access_log=False,
                log_level="warning",
                server_header=False,
            )
        )
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        deadline = time.monotonic() + _GATEWAY_READY_TIMEOUT_S
        while not (server.started and gateway.readiness()[0]):
            if serving.done():
                serving.result()
                raise DemoError("the gateway stopped before it was ready")
            if time.monotonic() > deadline:
                raise DemoError("the gateway did not become ready (see the log above)")
            await asyncio.sleep(0.05)
        url_host = f"[{host}]" if ":" in host else host
        print(
            _banner(f"http://{url_host}:{config.port}", ready, preset, time_scale, config.policy), flush=True
        )
        await serving
    finally:
        _stop_cluster(process)
        drain.cancel()
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            await asyncio.wait_for(process.wait(), 10)
        sock.close()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _as_sigterm(_signum: int, _frame: object) -> None:
    # Whoever handles SIGTERM right now (uvicorn while serving, ``_interrupt`` before) does the rest.
    signal.raise_signal(signal.SIGTERM)


def run_demo(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    servers: int = 2,
    dp_size: int = 4,
    preset: str = "h200-dp8",
    time_scale: float = 0.05,
    policy: str | None = None,
    pd: bool = False,
) -> int:
    """Run the demo until Ctrl-C (or SIGTERM); the process exit code."""
    # uvicorn re-raises the stop signal once it has shut down; SIGTERM's default action would kill
    # this process on the spot and leave the cluster running, so make it unwind like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    # Closing the terminal sends SIGHUP, whose default would kill this process and leave the
    # cluster behind: stop exactly as on SIGTERM (gracefully, through uvicorn once it serves).
    signal.signal(signal.SIGHUP, _as_sigterm)
    try:
        asyncio.run(
            _demo(
                host=host,
                port=port,
                servers=servers,
                dp_size=dp_size,
                preset=preset,
                time_scale=time_scale,
                policy=policy,
                pd=pd,
            )
        )
    except DemoError as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
