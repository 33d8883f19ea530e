"""Drive one rank in virtual time with closed-loop clients: calibration tests, docs numbers, quick studies.

Time advances by each step's ``duration_s``; a step's events happen at the step's end, as the contract says.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from backends.sim.engine._rank import RankEngine
from backends.sim.engine._server import ServerEngine
from backends.sim.engine._types import FinishReason, RequestFinished, SimRequest, TokensGenerated


class RequestTiming(msgspec.Struct):
    rid: str
    submitted_s: float
    first_token_s: float | None = None
    finished_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish: FinishReason | None = None

    @property
    def ttft_s(self) -> float:
        assert self.first_token_s is not None
        return self.first_token_s - self.submitted_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Output speed after the first token (what a single user sees as tok/s)."""
        assert self.first_token_s is not None and self.finished_s is not None
        span = self.finished_s - self.first_token_s
        return (self.completion_tokens - 1) / span if span > 0 else float("inf")


def run_closed_loop(
    rank: RankEngine,
    make_request: Callable[[int], SimRequest],
    *,
    concurrency: int,
    total_requests: int,
    max_steps: int = 5_000_000,
) -> list[RequestTiming]:
    """Keep ``concurrency`` requests in flight until ``total_requests`` have finished; return their timings.

    Request ``i`` is ``make_request(i)``; a client submits its next request the moment its last one finishes.
    """
    timings: dict[str, RequestTiming] = {}
    submitted = 0
    finished = 0
    clock = rank.now

    def submit() -> None:
        nonlocal submitted
        request = make_request(submitted)
        submitted += 1
        timings[request.rid] = RequestTiming(request.rid, clock)
        rank.add(request)

    for _ in range(min(concurrency, total_requests)):
        submit()
    for _ in range(max_steps):
        if finished >= total_requests:
            break
        if not rank.has_work():
            raise RuntimeError("rank went idle with requests outstanding")
        result = rank.step()
        clock = rank.now
        for event in result.events:
            timing = timings.get(event.rid)
            if timing is None:
                continue
            if isinstance(event, TokensGenerated) and timing.first_token_s is None and event.token_ids:
                timing.first_token_s = clock
            elif isinstance(event, RequestFinished):
                timing.finished_s = clock
                timing.prompt_tokens = event.prompt_tokens
                timing.completion_tokens = event.completion_tokens
                timing.cached_tokens = event.cached_tokens
                timing.finish = event.finish
                finished += 1
                if submitted < total_requests:
                    submit()
    else:
        raise RuntimeError("closed loop did not finish within max_steps")
    return list(timings.values())


def run_closed_loop_server(
    engine: ServerEngine,
    make_request: Callable[[int], SimRequest],
    *,
    concurrency: int,
    total_requests: int,
    max_steps: int = 5_000_000,
) -> list[RequestTiming]:
    """:func:`run_closed_loop` over every DP rank of a server, requests spread by ``engine.pick_rank()``.

    Each rank keeps its own clock; the rank whose current step ends first is stepped next, so ranks overlap in
    virtual time as they do on real GPUs.
    """
    ranks = engine.ranks
    free_at = [rank.now for rank in ranks]
    timings: dict[str, RequestTiming] = {}
    submitted = 0
    finished = 0
    clock = 0.0

    def submit() -> None:
        nonlocal submitted
        request = make_request(submitted)
        submitted += 1
        index = engine.pick_rank()
        if not ranks[index].has_work():
            free_at[index] = max(free_at[index], clock)
        timings[request.rid] = RequestTiming(request.rid, clock)
        ranks[index].add(request)

    for _ in range(min(concurrency, total_requests)):
        submit()
    for _ in range(max_steps):
        if finished >= total_requests:
            break
        busy = [i for i, rank in enumerate(ranks) if rank.has_work()]
        if not busy:
            raise RuntimeError("server went idle with requests outstanding")
        index = min(busy, key=lambda i: (free_at[i], i))
        result = ranks[index].step()
        free_at[index] += result.duration_s
        clock = free_at[index]
        for event in result.events:
            timing = timings.get(event.rid)
            if timing is None:
                continue
            if isinstance(event, TokensGenerated) and timing.first_token_s is None and event.token_ids:
                timing.first_token_s = clock
            elif isinstance(event, RequestFinished):
                timing.finished_s = clock
                timing.prompt_tokens = event.prompt_tokens
                timing.completion_tokens = event.completion_tokens
                timing.cached_tokens = event.cached_tokens
                timing.finish = event.finish
                finished += 1
                if submitted < total_requests:
                    submit()
    else:
        raise RuntimeError("closed loop did not finish within max_steps")
    return list(timings.values())
