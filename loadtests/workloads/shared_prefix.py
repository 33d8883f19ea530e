"""SGLang's ``generated-shared-prefix`` workload (bench_serving): G groups × P prompts; every prompt
of a group starts with the group's system prompt of S tokens and adds its own question of Q tokens;
O output tokens. Optionally group sizes follow a Zipf law (a few hot prefixes, a long tail), keeping
the total at G × P.
"""

from __future__ import annotations

import random

from loadtests.workloads.arrivals import poisson_arrivals
from loadtests.workloads.request import BenchRequest
from loadtests.workloads.text import filler_text

__all__ = ["generated_shared_prefix", "zipf_group_sizes"]


def zipf_group_sizes(groups: int, total: int, exponent: float) -> list[int]:
    """Split ``total`` prompts over ``groups`` groups with sizes ∝ 1/rank^exponent, every group ≥ 1,
    largest first, summing exactly to ``total`` (largest-remainder rounding)."""
    if groups < 1 or total < groups:
        raise ValueError("need at least one group and at least one prompt per group")
    weights = [1.0 / (rank**exponent) for rank in range(1, groups + 1)]
    spare = total - groups
    scale = spare / sum(weights)
    raw = [w * scale for w in weights]
    sizes = [1 + int(r) for r in raw]
    leftover = total - sum(sizes)
    by_remainder = sorted(range(groups), key=lambda i: (-(raw[i] - int(raw[i])), i))
    for i in by_remainder[:leftover]:
        sizes[i] += 1
    return sizes


def generated_shared_prefix(
    *,
    groups: int = 16,
    prompts_per_group: int = 16,
    system_tokens: int = 2048,
    question_tokens: int = 128,
    output_tokens: int = 256,
    rate_per_s: float | None = None,
    zipf_exponent: float | None = None,
    seed: int = 0,
) -> list[BenchRequest]:
    """Requests in random order (as bench_serving shuffles them) with Poisson arrivals at ``rate_per_s``."""
    total = groups * prompts_per_group
    sizes = (
        zipf_group_sizes(groups, total, zipf_exponent)
        if zipf_exponent is not None
        else [prompts_per_group] * groups
    )
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = [(g, p) for g, size in enumerate(sizes) for p in range(size)]
    rng.shuffle(pairs)
    arrivals = poisson_arrivals(len(pairs), rate_per_s, rng)
    systems = [filler_text(f"gsp-system:{seed}:{g}", system_tokens) for g in range(groups)]
    requests = []
    for index, ((group, prompt), arrival) in enumerate(zip(pairs, arrivals, strict=True)):
        question = filler_text(f"gsp-question:{seed}:{group}:{prompt}", question_tokens)
        requests.append(
            BenchRequest(
                rid=f"gsp-{index}",
                arrival_s=arrival,
                max_tokens=output_tokens,
                messages=[
                    {"role": "system", "content": systems[group]},
                    {"role": "user", "content": question},
                ],
                group=f"g{group}",
                target_prompt_tokens=system_tokens + question_tokens,
            )
        )
    return requests
