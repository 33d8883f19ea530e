"""Fixtures shared by every test package: free ports, a private redis-server, child processes.

Every process a test starts is started here, on a free port, with a deadline for becoming ready,
and is stopped (SIGTERM, then SIGKILL) when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def find_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` -> a port nothing listens on right now."""
    return find_free_port


class ChildProcess:
    """A child process whose output is collected in the background (so its pipe never fills)."""

    def __init__(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
    ) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self.process = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first output line matching ``pattern``; fails the test if it does not come in time."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new_line:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.process.poll() is not None and not self._reader.is_alive():
                    code = self.process.returncode
                    pytest.fail(f"{self.argv[:4]} exited ({code}) before {pattern!r}:\n{self.output}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(
                        f"{self.argv[:4]} did not print {pattern!r} within {timeout}s:\n{self.output}"
                    )
                self._new_line.wait(min(remaining, 0.2))

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return self.process.returncode


def wait_for_http(
    url: str, timeout: float = 30.0, status: int = 200, process: ChildProcess | None = None
) -> None:
    """Poll ``url`` until it answers ``status``."""
    import httpx  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.process.poll() is not None:
            pytest.fail(
                f"process exited ({process.process.returncode}) while waiting for {url}:\n{process.output}"
            )
        try:
            answer = httpx.get(url, timeout=1.0)
            if answer.status_code == status:
                return
            last = f"{answer.status_code} {answer.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.05)
    detail = f"\n{process.output}" if process is not None else ""
    pytest.fail(f"{url} did not answer {status} within {timeout}s (last: {last}){detail}")


@pytest.fixture
def spawn() -> Iterator[Callable[..., ChildProcess]]:
    """``spawn(argv, env=None)`` starts a process that is stopped when the test ends."""
    children: list[ChildProcess] = []

    def start(argv: Sequence[str], *, env: dict[str, str] | None = None) -> ChildProcess:
        child = ChildProcess(argv, env=env)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in reversed(children):
            child.stop()


@pytest.fixture
def python_module() -> Callable[..., list[str]]:
    """``python_module("gateway", "serve", ...)`` -> argv running a module with this interpreter."""

    def argv(module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    return argv


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[str]:
    """A private redis-server on a free port (never the system one on 6379); yields its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        pytest.skip("redis-server is not installed (.ci/run installs it with apt)")
    port = find_free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
