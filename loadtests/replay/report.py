"""Per-router summary of a replay (or an HTTP run) and its markdown table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import msgspec

from loadtests.stats import coefficient_of_variation, mean, percentile

__all__ = ["Summary", "markdown_table", "summarize"]


class Summary(msgspec.Struct, kw_only=True):
    system: str
    requests: int
    completed: int
    prompt_tokens: int
    cached_tokens: int
    hit_rate: float
    oracle_hit_rate: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tpot_mean_s: float | None
    tpot_p50_s: float | None
    output_tok_per_s: float | None
    duration_s: float
    spread_cv: float | None
    per_target: dict[str, int]
    wall_s: float | None = None
    errors: int = 0
    # What spread_cv counts requests over: "target" (server@rank) or "server" (when a router does
    # not say which rank it used, from the servers' own counters).
    spread_unit: str = "target"


def summarize(
    system: str,
    records: Sequence[object],
    *,
    targets: Sequence[str],
    wall_s: float | None = None,
    errors: int = 0,
) -> Summary:
    """``records`` need: target, arrival_s, prompt_tokens, cached_tokens, completion_tokens,
    finish_s, ttft_s, tpot_s and optionally oracle_cached_tokens (None-valued when unknown)."""
    done = [r for r in records if getattr(r, "finish_s", None) is not None]
    prompt = sum(int(getattr(r, "prompt_tokens", 0) or 0) for r in done)
    cached = sum(int(getattr(r, "cached_tokens", 0) or 0) for r in done)
    oracle_values = [getattr(r, "oracle_cached_tokens", None) for r in done]
    oracle = (
        sum(int(v) for v in oracle_values if v is not None) / prompt
        if prompt and all(v is not None for v in oracle_values)
        else None
    )
    ttfts = [t for r in done if (t := getattr(r, "ttft_s", None)) is not None]
    tpots = [t for r in done if (t := getattr(r, "tpot_s", None)) is not None]
    if done:
        start = min(float(getattr(r, "arrival_s", 0.0)) for r in records)
        end = max(float(getattr(r, "finish_s", 0.0)) for r in done)
        duration = max(end - start, 1e-9)
        output = sum(int(getattr(r, "completion_tokens", 0) or 0) for r in done) / duration
    else:
        duration = 0.0
        output = None
    counts = Counter(str(getattr(r, "target", "")) for r in records)
    per_target = {t: counts.get(t, 0) for t in targets}
    for t, n in counts.items():
        per_target.setdefault(t, n)
    return Summary(
        system=system,
        requests=len(records),
        completed=len(done),
        prompt_tokens=prompt,
        cached_tokens=cached,
        hit_rate=cached / prompt if prompt else 0.0,
        oracle_hit_rate=oracle,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_mean_s=mean(tpots),
        tpot_p50_s=percentile(tpots, 50),
        output_tok_per_s=output,
        duration_s=duration,
        spread_cv=coefficient_of_variation([float(v) for v in per_target.values()]),
        per_target=per_target,
        wall_s=wall_s,
        errors=errors,
    )


def _f(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown_table(summaries: Sequence[Summary]) -> str:
    lines = [
        "| system | done/sent | cache hit (tok) | oracle | TTFT p50 s | TTFT p99 s | TPOT mean ms "
        "| out tok/s | spread CV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        tpot_ms = None if s.tpot_mean_s is None else s.tpot_mean_s * 1000
        lines.append(
            f"| {s.system} | {s.completed}/{s.requests} | {s.hit_rate:.1%} | {_f(s.oracle_hit_rate, '.1%')} "
            f"| {_f(s.ttft_p50_s, '.3f')} | {_f(s.ttft_p99_s, '.3f')} | {_f(tpot_ms, '.1f')} "
            f"| {_f(s.output_tok_per_s, ',.0f')} | {_f(s.spread_cv, '.2f')}"
            f"{' (per server)' if s.spread_unit == 'server' and s.spread_cv is not None else ''} |"
        )
    return "\n".join(lines)
