"""Starting the trivial upstream as a subprocess for a benchmark run."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

READY = "TRIVIAL-UPSTREAM-READY"


@contextlib.asynccontextmanager
async def trivial_upstream(
    chunks: int = 16, dp_size: int = 1, timeout_s: float = 15.0, idle_timeout_s: float = 5.0
) -> AsyncIterator[str]:
    """Run ``python -m loadtests.trivial_upstream`` on a free loopback port; yields its base URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtests.trivial_upstream",
        "--port",
        "0",
        "--chunks",
        str(chunks),
        "--dp-size",
        str(dp_size),
        "--idle-timeout",
        str(idle_timeout_s),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
        text = line.decode().strip()
        if not text.startswith(READY):
            raise RuntimeError(f"trivial upstream did not start: {text!r}")
        yield f"http://127.0.0.1:{int(text.split()[1])}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
