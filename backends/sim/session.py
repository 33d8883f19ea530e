"""One generation exchange's life around the runtime: injected faults, client disconnects, cut connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType

from backends.sim.asgi import JSON, HttpRequest
from backends.sim.runtime import GenerationInput, Progress, Runtime

_HANG_POLL_S = 0.25


class CutConnection(Exception):
    """The drop-mid-stream fault fired: the handler must return without finishing the response."""


class Exchange:
    def __init__(self, req: HttpRequest, runtime: Runtime) -> None:
        self._req = req
        self._runtime = runtime
        self._rids: list[str] = []
        self._chunks = 0
        self._watcher: asyncio.Task[None] | None = None
        self.disconnected = False

    @property
    def request(self) -> HttpRequest:
        return self._req

    async def __aenter__(self) -> Exchange:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        await self._req.wait_disconnect()
        self.disconnected = True
        for rid in self._rids:
            self._runtime.abort(rid)

    async def admit(self) -> bool:
        """Apply the latency and hang faults; False if the client left meanwhile."""
        faults = self._runtime.faults
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000.0)
        while self._runtime.faults.hang and not self.disconnected:
            # Woken when the hang is lifted; the timeout notices a client that gave up meanwhile.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._runtime.hang_released.wait(), _HANG_POLL_S)
        return not self.disconnected

    def track(self, items: list[GenerationInput]) -> None:
        self._rids = [item.rid for item in items]

    def _cut(self) -> None:
        for rid in self._rids:
            self._runtime.abort(rid)
        raise CutConnection

    async def send_chunk(self, chunk: bytes) -> None:
        drop = self._runtime.faults.drop_after_chunks
        if drop is not None and self._chunks >= drop:
            self._cut()
        await self._req.stream(chunk)
        self._chunks += 1

    async def respond_unary(self, body: bytes, status: int = 200) -> None:
        if self._runtime.faults.drop_after_chunks is not None:
            # Announce the full length, send half, and go: the client sees the connection die mid-body.
            headers = [(b"content-length", str(len(body)).encode()), (b"content-type", JSON)]
            await self._req.start(status, headers)
            await self._req.send(
                {"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True}
            )
            raise CutConnection
        await self._req.respond(status, body)


async def merge_generations(
    runtime: Runtime, items: list[GenerationInput]
) -> AsyncIterator[tuple[int, Progress]]:
    """Progress of several sequences as it arrives, tagged with the sequence's index."""
    if len(items) == 1:
        async for p in runtime.generate(items[0]):
            yield 0, p
        return
    queue: asyncio.Queue[tuple[int, Progress | BaseException | None]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for p in runtime.generate(items[i]):
                queue.put_nowait((i, p))
        except Exception as exc:  # handed to the consumer, which decides the response
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(items))]
    remaining = len(items)
    try:
        while remaining:
            i, got = await queue.get()
            if got is None:
                remaining -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield i, got
    finally:
        for task in tasks:
            task.cancel()
