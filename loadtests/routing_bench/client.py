"""Open-loop streaming HTTP client: sends each request at its arrival time (or when the chat round
it follows has finished plus think time), streams the answer and measures TTFT and TPOT on the
client side; prompt, cached and completion tokens come from the final usage chunk."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence

import aiohttp
import msgspec

from loadtests.workloads.request import BenchRequest

__all__ = ["HttpRecord", "run_open_loop"]


class HttpRecord(msgspec.Struct, kw_only=True):
    rid: str
    entry: str  # the base URL the request was sent to (gateway replica / router)
    arrival_s: float  # when it was sent, from the start of the run
    target: str = ""  # server@rank when the router says (Cachet receipt headers)
    status: int = 0
    error: str | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int = 0
    # Cachet's receipt: the cached tokens the router predicted (x-cachet-cached-tokens).
    predicted_cached_tokens: int | None = None
    # Filled in after the run: the oracle's cached tokens for this request in the order it was sent.
    oracle_cached_tokens: int | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.finish_s is None or self.completion_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.completion_tokens - 1)


def _body(request: BenchRequest, model: str) -> tuple[str, bytes]:
    common: dict[str, object] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        # SGLang extension: generate exactly max_tokens so every system produces the same work.
        "ignore_eos": True,
    }
    if request.messages is not None:
        return "/v1/chat/completions", json.dumps({**common, "messages": request.messages}).encode()
    return "/v1/completions", json.dumps({**common, "prompt": request.prompt}).encode()


def _has_token(chunk: dict[str, object]) -> bool:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            return True
        if choice.get("text"):
            return True
    return False


async def _send(
    session: aiohttp.ClientSession,
    entry: str,
    request: BenchRequest,
    *,
    model: str,
    start: float,
    timeout_s: float,
) -> HttpRecord:
    path, body = _body(request, model)
    record = HttpRecord(rid=request.rid, entry=entry, arrival_s=time.perf_counter() - start)
    try:
        async with session.post(
            entry + path,
            data=body,
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=5.0),
        ) as response:
            record.status = response.status
            worker = response.headers.get("x-cachet-worker")
            if worker:
                record.target = f"{worker}@{response.headers.get('x-cachet-dp-rank', '0')}"
            predicted = response.headers.get("x-cachet-cached-tokens")
            if predicted is not None and predicted.isdigit():
                record.predicted_cached_tokens = int(predicted)
            if response.status != 200:
                record.error = (await response.read())[:300].decode(errors="replace")
                return record
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]" or not payload:
                        continue
                    if record.first_token_s is None or b'"usage"' in payload:
                        chunk = json.loads(payload)
                        if record.first_token_s is None and _has_token(chunk):
                            record.first_token_s = time.perf_counter() - start
                        usage = chunk.get("usage")
                        if isinstance(usage, dict):
                            record.prompt_tokens = usage.get("prompt_tokens")
                            record.completion_tokens = int(usage.get("completion_tokens") or 0)
                            details = usage.get("prompt_tokens_details")
                            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                                record.cached_tokens = int(details["cached_tokens"])
            record.finish_s = time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def run_open_loop(
    requests: Sequence[BenchRequest],
    entries: Sequence[str],
    *,
    model: str,
    timeout_s: float = 300.0,
    max_connections: int = 512,
    deadline_s: float | None = None,
) -> list[HttpRecord]:
    """Send ``requests`` (sorted by arrival) spread round-robin over ``entries``; return one record
    per request sent. Requests not yet started at ``deadline_s`` are not sent."""
    if not entries:
        raise ValueError("need at least one entry URL")
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections, force_close=False)
    done_events: dict[str, asyncio.Event] = {r.rid: asyncio.Event() for r in requests}
    finished_at: dict[str, float] = {}
    records: list[HttpRecord] = []
    spread = itertools.cycle(entries)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()

        async def one(request: BenchRequest, entry: str) -> None:
            try:
                if deadline_s is not None and request.arrival_s > deadline_s:
                    return
                delay = request.arrival_s - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                if request.after is not None and request.after in done_events:
                    await done_events[request.after].wait()
                    if request.after not in finished_at:
                        return  # the previous round was never sent or failed: the chat stops here
                    wait = finished_at[request.after] + request.think_s - (time.perf_counter() - start)
                    if wait > 0:
                        await asyncio.sleep(wait)
                if deadline_s is not None and time.perf_counter() - start > deadline_s:
                    return
                record = await _send(session, entry, request, model=model, start=start, timeout_s=timeout_s)
                records.append(record)
                if record.finish_s is not None and record.error is None:
                    finished_at[request.rid] = record.finish_s
            finally:
                done_events[request.rid].set()

        await asyncio.gather(*(one(r, next(spread)) for r in requests))
    return records
