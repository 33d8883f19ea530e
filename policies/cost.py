"""The shared cost model: how long until a request's first token on a given target.

Mooncake's Conductor and Preble reduce routing to one comparable number per target: the time to
first token (TTFT) = time waiting behind the work already queued there + time prefilling the part
of this prompt that is not cached there. Both terms are divided by *that* target's prefill speed,
so a fast 8×H200 node and a slow 16×H20 TP16 pair are compared in seconds, not in tokens.
"""

from __future__ import annotations

from policies.types import RequestFeatures, TargetView

__all__ = [
    "SIBLING_PREFILL_WEIGHT",
    "estimate",
    "prefill_s",
    "queue_wait_s",
    "queued_prefill_tokens",
    "running_requests",
    "score_s",
    "ttft_s",
    "uncached_tokens",
]

# Below this speed a target is treated as this slow (guards a zero or missing seed).
_MIN_PREFILL_TOKENS_PER_S = 1.0
# What a prompt token queued on a sibling DP rank costs this rank, relative to one of its own: the
# MoE share of a prefill step, which the ranks run together (DeepSeek-V3 on 8×H200 in the engine
# model: a 2,113-token sibling prefill adds 36 ms to a 2,113-token prefill of 80 ms, about 0.45).
SIBLING_PREFILL_WEIGHT = 0.5


def queued_prefill_tokens(target: TargetView) -> int:
    """Prompt tokens ahead of a new request on this target.

    The gateway's own leases are the freshest signal; the server's last report also sees traffic
    from other clients, but may be a poll interval old. Take the larger: neither undercounts the other.
    """
    reported = target.reported_waiting_tokens
    if reported is None or reported < target.inflight_prefill_tokens:
        return target.inflight_prefill_tokens
    return reported


def running_requests(target: TargetView) -> int:
    reported = (target.reported_running or 0) + (target.reported_waiting or 0)
    return max(reported, target.inflight_requests)


def queue_wait_s(target: TargetView) -> float:
    """Seconds before this target starts prefilling a new request.

    Queued prompt tokens at this target's prefill speed (its own, and its sibling DP ranks' at
    ``SIBLING_PREFILL_WEIGHT``), plus half a decode step when a batch is running: SGLang finishes the
    step in flight before it schedules the new prefill.
    """
    speed = max(target.prefill_tokens_per_s, _MIN_PREFILL_TOKENS_PER_S)
    queued = queued_prefill_tokens(target) + SIBLING_PREFILL_WEIGHT * target.sibling_prefill_tokens
    wait = queued / speed
    if running_requests(target) > 0:
        wait += 0.5 * target.decode_step_s
    return wait


def uncached_tokens(features: RequestFeatures, target: TargetView) -> int:
    # SGLang never reuses the whole prompt: at least the last token is computed.
    cached = min(target.predicted_cached_tokens, max(features.prompt_tokens - 1, 0))
    return max(features.prompt_tokens - cached, 1)


def prefill_s(features: RequestFeatures, target: TargetView) -> float:
    """Seconds this request's own uncached part takes to prefill on ``target``."""
    return uncached_tokens(features, target) / max(target.prefill_tokens_per_s, _MIN_PREFILL_TOKENS_PER_S)


def score_s(
    features: RequestFeatures, target: TargetView, work_weight: float, stall_weight: float = 0.0
) -> float:
    """``ttft_s`` + (``work_weight`` + ``stall_weight`` × requests running there) × this request's own
    prefill time on ``target`` (one body: it runs for every candidate of every decision).

    The stall term: SGLang runs a prefill between decode steps, so each request already running on
    the target waits out this prompt's uncached prefill before its next token.
    """
    return estimate(features, target, work_weight, stall_weight)[0]


def estimate(
    features: RequestFeatures, target: TargetView, work_weight: float, stall_weight: float
) -> tuple[float, float, float, int]:
    """``(score_s, queue_wait_s, prefill_s, running_requests)`` of ``features`` on ``target`` in one
    pass (the policy needs all four for every candidate; separate calls cost twice as much)."""
    speed = max(target.prefill_tokens_per_s, _MIN_PREFILL_TOKENS_PER_S)
    own = target.inflight_prefill_tokens
    reported = target.reported_waiting_tokens
    if reported is not None and reported > own:
        own = reported
    queued = own + SIBLING_PREFILL_WEIGHT * target.sibling_prefill_tokens
    prompt = features.prompt_tokens
    cached = target.predicted_cached_tokens
    if cached > prompt - 1:
        cached = prompt - 1 if prompt > 0 else 0
    uncached = max(prompt - cached, 1)
    running = target.inflight_requests
    reported_running = (target.reported_running or 0) + (target.reported_waiting or 0)
    running = max(running, reported_running)
    wait = queued / speed
    if running > 0:
        wait += 0.5 * target.decode_step_s
    prefill = uncached / speed
    return wait + (1.0 + work_weight + stall_weight * running) * prefill, wait, prefill, running


def ttft_s(features: RequestFeatures, target: TargetView) -> float:
    """Estimated time to first token of ``features`` on ``target``, in seconds: queue wait
    (``queue_wait_s``) + this prompt's uncached prefill (``prefill_s``), from ``estimate``'s one pass."""
    _, wait, prefill, _ = estimate(features, target, 0.0, 0.0)
    return wait + prefill
