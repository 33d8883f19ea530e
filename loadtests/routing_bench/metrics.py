"""Server-side counters: the simulated servers' Prometheus /metrics, summed over labels, so a run's
cache hits and per-server request counts are known even through routers that say nothing about
where a request went."""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

__all__ = ["COUNTERS", "scrape_counters"]

COUNTERS = ("sglang:num_requests_total", "sglang:prompt_tokens_total", "sglang:generation_tokens_total")
_CACHED = "sglang:cached_tokens_total"


def _parse(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        # The cached-token counter comes once per cache source; "total" (or an unlabelled one) is the sum.
        cached_total = name == _CACHED and (
            'cache_source="total"' in name_part or "cache_source" not in name_part
        )
        if name in COUNTERS or cached_total:
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


async def scrape_counters(server_urls: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per server URL: the request, prompt, generation and cached token counters."""
    out: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as session:
        for url in server_urls:
            async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10.0)) as response:
                out[url] = _parse(await response.text()) if response.status == 200 else {}
    return out
