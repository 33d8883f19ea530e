"""Multi-round chat (vLLM production-stack's multi-round QA shape): U users × R rounds. Every user's
conversation starts with one system prompt shared by all users, then a per-user context; each round
appends the user's question and, from the round before, the assistant's answer, so the prompt grows
and each round's prefix is the previous round's prompt.

Answers are fixed filler text of the requested output length rather than what a server generated,
so the workload is plain data; a server's cache holds its own generated tokens, which this history
does not repeat, so reuse across rounds is exactly the previous prompt (as in the benchmark when run
against a simulator that does not produce the same text).
"""

from __future__ import annotations

import random

from loadtests.workloads.arrivals import poisson_arrivals
from loadtests.workloads.request import BenchRequest
from loadtests.workloads.text import filler_text

__all__ = ["multi_round_chat"]


def multi_round_chat(
    *,
    users: int = 16,
    rounds: int = 5,
    system_tokens: int = 1024,
    user_context_tokens: int = 1024,
    question_tokens: int = 64,
    answer_tokens: int = 128,
    think_s: float = 2.0,
    user_rate_per_s: float | None = 2.0,
    seed: int = 0,
) -> list[BenchRequest]:
    """Requests sorted by arrival. Round 1 of each user arrives by a Poisson process of users at
    ``user_rate_per_s``; round r+1 waits for round r (``after``) plus ``think_s``."""
    rng = random.Random(seed)
    starts = poisson_arrivals(users, user_rate_per_s, rng)
    system = filler_text(f"chat-system:{seed}", system_tokens)
    requests = []
    for user, start in enumerate(starts):
        context = filler_text(f"chat-context:{seed}:{user}", user_context_tokens)
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        previous: str | None = None
        history_tokens = system_tokens
        for round_ in range(rounds):
            question = filler_text(f"chat-question:{seed}:{user}:{round_}", question_tokens)
            content = context + question if round_ == 0 else question
            history_tokens += question_tokens + (user_context_tokens if round_ == 0 else 0)
            messages = [*messages, {"role": "user", "content": content}]
            rid = f"chat-u{user}-r{round_}"
            requests.append(
                BenchRequest(
                    rid=rid,
                    arrival_s=start,
                    max_tokens=answer_tokens,
                    messages=messages,
                    after=previous,
                    think_s=think_s if previous is not None else 0.0,
                    group=f"u{user}",
                    target_prompt_tokens=history_tokens,
                )
            )
            answer = filler_text(f"chat-answer:{seed}:{user}:{round_}", answer_tokens)
            messages = [*messages, {"role": "assistant", "content": answer}]
            history_tokens += answer_tokens
            previous = rid
    requests.sort(key=lambda r: r.arrival_s)
    return requests
