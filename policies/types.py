"""The vocabulary every routing policy speaks: targets, a snapshot of the cluster, a decision.

Policies are pure: ``decide(features, snapshot, rng) -> Decision`` reads nothing else (no I/O, no
clock), so the same code runs in the gateway and in offline trace replays, and tests pin decisions
exactly. Everything a policy may weigh must therefore be in these types.
"""

from __future__ import annotations

import enum
import random
from typing import Protocol

import msgspec


class Role(enum.StrEnum):
    """What a server does in the cluster (SGLang's --disaggregation-mode, "null" being regular)."""

    REGULAR = "regular"
    PREFILL = "prefill"
    DECODE = "decode"


class TargetKey(msgspec.Struct, frozen=True, order=True):
    """One place a request can be served: a server and one of its data-parallel attention ranks.

    ``dp_rank`` is 0 for a server with dp_size 1; such a server is a single target and no rank is
    sent upstream.
    """

    worker: str
    dp_rank: int = 0

    def label(self) -> str:
        return f"{self.worker}@{self.dp_rank}"


class TargetView(msgspec.Struct, frozen=True):
    """Everything known about one target at decision time. Immutable; built per decision."""

    key: TargetKey
    role: Role
    dp_size: int
    # KV-cache capacity of this rank in tokens (max_total_num_tokens of the server / rank).
    capacity_tokens: int
    # Modelled or measured speed of this rank: prompt tokens prefilled per second, and the time
    # one decode step takes for a typical batch.
    prefill_tokens_per_s: float
    decode_step_s: float
    # What the gateways themselves have in flight on this target (from leases).
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    # What the server last reported (/v1/loads or /get_load); None when never reported.
    reported_waiting: int | None = None
    reported_running: int | None = None
    reported_token_usage: float | None = None
    # How many of this request's prompt tokens the prefix index predicts are cached here.
    predicted_cached_tokens: int = 0
    # Prompt tokens the server reported waiting to be prefilled (num_waiting_uncached_tokens).
    reported_waiting_tokens: int | None = None
    # Prompt tokens queued for prefill on the server's *other* DP ranks (leases or reports, the
    # larger per rank). Under DP attention the ranks run the MoE layers in lock-step, so a sibling's
    # prefill slows this rank's steps too.
    sibling_prefill_tokens: int = 0


class RequestFeatures(msgspec.Struct, frozen=True):
    """What routing knows about a request without tokenising it."""

    model: str
    # Estimated prompt length in tokens.
    prompt_tokens: int
    max_new_tokens: int = 128
    stream: bool = False
    # Chained hashes of fixed-size blocks of the canonical prompt, first block first.
    block_hashes: tuple[int, ...] = ()
    # Tokens one block stands for (estimated), so matched blocks convert to cached tokens.
    block_tokens: int = 0


class Snapshot(msgspec.Struct, frozen=True):
    """The candidates for one decision: healthy targets that serve the request's model and role."""

    targets: tuple[TargetView, ...]
    # Requests this gateway has routed for this model so far; lets round robin stay pure.
    sequence: int = 0
    # Indices into ``targets`` of those with a predicted cached prefix, deepest match first. May be
    # capped (large clusters); policies that scan every target need not read it.
    matched: tuple[int, ...] = ()
    # Mean in-flight requests over ALL targets of the model; lets a policy that looks at a sample of
    # a large snapshot still apply a load bound. None: compute it from ``targets``.
    mean_inflight_requests: float | None = None


class Decision(msgspec.Struct, frozen=True):
    """Where a request goes and why. ``reason`` is short, human-readable, and sent back to the client."""

    target: TargetKey
    policy: str
    reason: str
    predicted_cached_tokens: int = 0
    # Estimated time to first token on the chosen target, seconds (None if the policy does not model it).
    predicted_ttft_s: float | None = None
    # Next-best targets, best first: where to go if ``target`` turns out to be taken by another gateway
    # replica at reservation time.
    alternatives: tuple[TargetKey, ...] = ()


class NoTarget(Exception):
    """Raised by a policy given a snapshot with no target it can use."""


class Policy(Protocol):
    """A routing policy: a name and a pure decision function."""

    name: str

    def decide(self, features: RequestFeatures, snapshot: Snapshot, rng: random.Random) -> Decision: ...
