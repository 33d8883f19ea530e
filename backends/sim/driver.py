"""Drives one DP rank's pure scheduler in (scaled) real time and hands its events to the waiting requests.

One asyncio task per rank: wait for work, call `step()`, sleep the step's duration × time scale, then
deliver the step's events — so a token is never seen before the simulated GPU has produced it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from backends.sim.engine import (
    FinishReason,
    RankEngine,
    RequestFinished,
    RequestScheduled,
    SimRequest,
    TokensGenerated,
)

Event = RequestScheduled | TokensGenerated | RequestFinished
_MIN_SLEEP_S = 0.0005
_MAX_LAG_S = 0.05


class RequestHandle:
    """The receiving end of one request's events (filled by the rank driver, drained by the HTTP handler)."""

    __slots__ = ("_closed", "_events", "_waiter", "dp_rank", "rid")

    def __init__(self, rid: str, dp_rank: int) -> None:
        self.rid = rid
        self.dp_rank = dp_rank
        self._events: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def push(self, event: Event) -> None:
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Wake the consumer with nothing more to come (server shutdown)."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_events(self) -> list[Event]:
        """All events delivered since the last call; [] means the request will get no more."""
        while not self._events:
            if self._closed:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        events = self._events
        self._events = []
        return events


class RankDriver:
    """Owns one RankEngine: admission, the step loop, event delivery, aborts."""

    def __init__(
        self,
        engine: RankEngine,
        dp_rank: int,
        *,
        time_scale: float,
        slowdown: Callable[[], float],
        on_events: Callable[[int, list[Event]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.dp_rank = dp_rank
        self._time_scale = time_scale
        self._slowdown = slowdown
        self._on_events = on_events
        self._handles: dict[str, RequestHandle] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sim-rank-{self.dp_rank}")

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def submit(self, request: SimRequest) -> RequestHandle:
        handle = RequestHandle(request.rid, self.dp_rank)
        if self._stopped:  # shutting down: the request gets the shutdown abort straight away
            handle.close()
            return handle
        self._handles[request.rid] = handle
        self.engine.add(request)
        self._wake.set()
        return handle

    def abort(self, rid: str, message: str = "Abort before prefill") -> bool:
        """Stop a request and free its rank resources; its handle gets an abort finish if it had none."""
        handle = self._handles.pop(rid, None)
        known = self.engine.abort(rid)
        if handle is not None:
            handle.push(
                RequestFinished(
                    rid=rid,
                    finish=FinishReason(type="abort", length=None, matched=None, message=message),
                    prompt_tokens=0,
                    completion_tokens=0,
                    cached_tokens=0,
                )
            )
        self._wake.set()
        return known or handle is not None

    def has(self, rid: str) -> bool:
        return rid in self._handles

    @property
    def in_flight(self) -> int:
        return len(self._handles)

    async def _run(self) -> None:
        engine = self.engine
        loop = asyncio.get_running_loop()
        # Steps are paced against a running deadline rather than slept one by one: event-loop timers have
        # millisecond granularity, and sub-millisecond (scaled) steps would otherwise each cost a full tick.
        deadline = loop.time()
        while True:
            if not engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
                continue
            result = engine.step()
            self.steps += 1
            now = loop.time()
            # Catch up on timer overshoot, but never by more than _MAX_LAG_S (e.g. after the CPU was starved).
            deadline = (
                max(deadline, now - _MAX_LAG_S) + result.duration_s * self._time_scale * self._slowdown()
            )
            # Always yield, even when behind schedule, so HTTP handlers keep running.
            await asyncio.sleep(deadline - now if deadline - now > _MIN_SLEEP_S else 0)
            if result.events:
                self._deliver(result.events)

    def _deliver(self, events: list[Event]) -> None:
        handles = self._handles
        for event in events:
            handle = handles.get(event.rid)
            if handle is None:
                continue  # aborted meanwhile
            handle.push(event)
            if isinstance(event, RequestFinished):
                del handles[event.rid]
        if self._on_events is not None:
            self._on_events(self.dp_rank, events)
