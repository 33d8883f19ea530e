"""The event-driven replay: arrivals and per-rank scheduler steps on one virtual clock.

A heap holds two kinds of events: a request arriving (routed at once, added to its rank), and a
rank's step completing. A rank with work is always mid-step: ``step()`` returns how long the
iteration takes, the loop advances the clock by that, delivers the step's events (first token,
tokens, finish), then steps again; a rank without work idles until a request lands on it. Nothing
sleeps and nothing opens a socket, so an hour of trace replays in seconds to minutes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

from backends.sim.engine import (
    RankEngine,
    RequestFinished,
    RequestScheduled,
    SimRequest,
    StepResult,
    Tokenizer,
    TokensGenerated,
    render_chat,
)
from loadtests.replay.cluster import ReplayCluster
from loadtests.replay.oracle import OracleCache
from loadtests.replay.routers import Finished, ReplayRouter
from loadtests.workloads.mooncake import block_text
from loadtests.workloads.request import BenchRequest
from policies.types import TargetKey

__all__ = ["RequestRecord", "RequestTokens", "oracle_hits", "replay"]

_ARRIVE = 0
_STEP_DONE = 1


class RequestRecord(msgspec.Struct, kw_only=True):
    rid: str
    target: str
    arrival_s: float
    prompt_tokens: int
    oracle_cached_tokens: int
    max_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.finish_s is None or self.completion_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.completion_tokens - 1)


class RequestTokens:
    """Token ids of a request as the server would compute them (chat template, BOS), with Mooncake
    prompts assembled from cached per-block ids (the filler text tokenises block by block)."""

    def __init__(self) -> None:
        self.tokenizer = Tokenizer()
        self._blocks: dict[int, list[int]] = {}

    def _block(self, block_id: int) -> list[int]:
        ids = self._blocks.get(block_id)
        if ids is None:
            if len(self._blocks) >= 50_000:
                self._blocks.clear()
            ids = self._blocks[block_id] = self.tokenizer.encode(block_text(block_id))
        return ids

    def ids(self, request: BenchRequest) -> list[int]:
        if request.messages is not None:
            return self.tokenizer.encode(render_chat(list(request.messages)))
        assert request.prompt is not None
        if request.block_ids:
            out = [self.tokenizer.bos_token_id]
            for block_id in request.block_ids:
                out.extend(self._block(block_id))
            del out[1 + request.target_prompt_tokens :]
            return out
        return self.tokenizer.encode(request.prompt, add_bos=True)


def oracle_hits(requests: Iterable[BenchRequest]) -> dict[str, int]:
    """Per request id, in the given (send) order: the oracle's cached tokens."""
    tokens = RequestTokens()
    oracle = OracleCache()
    return {request.rid: oracle.observe(tokens.ids(request)) for request in requests}


class _Flight:
    __slots__ = ("handle", "record", "target")

    def __init__(self, record: RequestRecord, target: TargetKey, handle: Any) -> None:
        self.record = record
        self.target = target
        self.handle = handle


async def replay(
    requests: Iterable[BenchRequest],
    cluster: ReplayCluster,
    router: ReplayRouter,
    *,
    oracle: OracleCache | None = None,
    max_virtual_s: float | None = None,
) -> list[RequestRecord]:
    """Replay ``requests`` (sorted by ``arrival_s``) through ``router`` onto ``cluster``; one record
    per request, in completion order. Requests still running at ``max_virtual_s`` are left
    unfinished in their records."""
    tokens = RequestTokens()
    oracle = oracle if oracle is not None else OracleCache()
    ranks = cluster.ranks
    heap: list[tuple[float, int, int, Any]] = []
    order = itertools.count()
    busy: set[TargetKey] = set()
    flights: dict[str, _Flight] = {}
    waiting_on: dict[str, list[BenchRequest]] = {}
    finished_rids: dict[str, float] = {}
    records: list[RequestRecord] = []
    source: Iterator[BenchRequest] = iter(requests)
    last_arrival = -1.0

    def pull_next() -> None:
        nonlocal last_arrival
        for request in source:
            if request.arrival_s < last_arrival:
                raise ValueError(f"requests must be sorted by arrival_s ({request.rid} is out of order)")
            last_arrival = request.arrival_s
            if request.after is not None:
                done_at = finished_rids.get(request.after)
                if done_at is None:
                    waiting_on.setdefault(request.after, []).append(request)
                    continue
                at = max(request.arrival_s, done_at + request.think_s)
                heapq.heappush(heap, (at, next(order), _ARRIVE, (request, False)))
                continue
            heapq.heappush(heap, (request.arrival_s, next(order), _ARRIVE, (request, True)))
            return

    def start_step(target: TargetKey, rank: RankEngine, now: float) -> None:
        result = rank.step()
        heapq.heappush(heap, (now + result.duration_s, next(order), _STEP_DONE, (target, result)))
        busy.add(target)

    pull_next()
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if max_virtual_s is not None and now > max_virtual_s:
            break
        if kind == _ARRIVE:
            request, from_source = payload
            if from_source:
                pull_next()
            ids = tokens.ids(request)
            target, handle = await router.route(request, now)
            record = RequestRecord(
                rid=request.rid,
                target=target.label(),
                arrival_s=now,
                prompt_tokens=len(ids),
                oracle_cached_tokens=oracle.observe(ids),
                max_tokens=request.max_tokens,
            )
            flights[request.rid] = _Flight(record, target, handle)
            rank = ranks[target]
            rank.add(SimRequest(request.rid, ids, request.max_tokens, ignore_eos=True))
            if target not in busy:
                start_step(target, rank, now)
            continue
        target, result = payload
        assert isinstance(result, StepResult)
        for event in result.events:
            if isinstance(event, TokensGenerated):
                flight = flights.get(event.rid)
                if flight is not None and flight.record.first_token_s is None and event.token_ids:
                    flight.record.first_token_s = now
            elif isinstance(event, RequestScheduled):
                flight = flights.get(event.rid)
                if flight is not None:
                    flight.record.cached_tokens = event.cached_tokens
            elif isinstance(event, RequestFinished):
                finished_flight = flights.pop(event.rid, None)
                if finished_flight is None:
                    continue
                record = finished_flight.record
                record.finish_s = now
                record.cached_tokens = event.cached_tokens
                record.completion_tokens = event.completion_tokens
                if record.first_token_s is None and event.completion_tokens > 0:
                    record.first_token_s = now
                records.append(record)
                await router.finish(
                    finished_flight.handle,
                    Finished(
                        prompt_tokens=event.prompt_tokens,
                        cached_tokens=event.cached_tokens,
                        completion_tokens=event.completion_tokens,
                        ttft_s=record.ttft_s,
                        e2e_s=now - record.arrival_s,
                    ),
                    now,
                )
                finished_rids[event.rid] = now
                for follower in waiting_on.pop(event.rid, ()):
                    at = max(follower.arrival_s, now + follower.think_s)
                    heapq.heappush(heap, (at, next(order), _ARRIVE, (follower, False)))
        rank = ranks[target]
        if rank.has_work():
            start_step(target, rank, now)
        else:
            busy.discard(target)
    records.extend(flight.record for flight in flights.values())
    return records
