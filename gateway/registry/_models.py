"""What the registry knows about each upstream server."""

from __future__ import annotations

import msgspec

from policies.types import Role, TargetKey

# Speed seeds used until something better is known (a server advertises its own — the simulator
# can, SGLang does not — or they are measured: the decode step from /v1/loads by the registry, the
# prefill speed from observed TTFTs by the Router). Decode: DeepSeek-V3 is memory-bandwidth
# bound, one step cannot beat 37 GB of active FP8 weights at 1979 GB/s, i.e. 1/53.5 s. Prefill:
# LMSYS's DeepSeek-V3 deployment on H100 nodes (May 2025) reports 52.3k input tokens/s per 8-GPU
# prefill node; a node's DP ranks share it.
DEFAULT_DECODE_STEP_S = 1.0 / 53.5
DEFAULT_NODE_PREFILL_TOKENS_PER_S = 52_300.0
# SGLang's KV capacity is unknown before discovery; this only matters for undiscovered (hence
# unhealthy, hence unroutable) workers, but keeps Worker total.
UNKNOWN_CAPACITY_TOKENS = 0


class WorkerSpec(msgspec.Struct, frozen=True):
    """A server the operator configured. ``model`` overrides the served name the server reports."""

    url: str
    role: Role = Role.REGULAR
    bootstrap_port: int | None = None
    model: str | None = None


class Worker(msgspec.Struct, frozen=True):
    """One upstream server as discovered. Immutable: the registry swaps in a new one on change.

    ``prefill_tokens_per_s`` and ``decode_step_s`` are per DP rank. ``discovered`` is False until the
    server has answered /server_info once; an undiscovered worker is never healthy.
    """

    url: str
    model: str = "default"
    role: Role = Role.REGULAR
    dp_size: int = 1
    page_size: int = 1
    max_total_num_tokens: int = UNKNOWN_CAPACITY_TOKENS
    version: str = ""
    bootstrap_port: int | None = None
    healthy: bool = False
    context_length: int | None = None
    prefill_tokens_per_s: float = DEFAULT_NODE_PREFILL_TOKENS_PER_S
    decode_step_s: float = DEFAULT_DECODE_STEP_S
    model_path: str | None = None
    max_running_requests: int | None = None
    discovered: bool = False

    def targets(self) -> list[TargetKey]:
        """The places this server can serve a request: one per DP rank."""
        return [TargetKey(self.url, rank) for rank in range(self.dp_size)]


class ReportedLoad(msgspec.Struct, frozen=True):
    """A DP rank's load as the server last reported it, and how old that report is.

    ``waiting``/``running`` are None when the server's endpoint does not report them (pre-2025-09
    ``/get_load``); ``token_usage`` is the used fraction of the rank's KV capacity.
    """

    waiting: int | None
    running: int | None
    token_usage: float | None
    age_s: float
    used_tokens: int | None = None
    waiting_uncached_tokens: int | None = None
    gen_throughput: float | None = None
    cache_hit_rate: float | None = None
    # The rank's decode step measured from its reports (running / gen_throughput, smoothed; see
    # gateway.registry._speeds); None until a running batch has been seen. Not aged: a speed.
    decode_step_s: float | None = None

    @property
    def age(self) -> float:
        return self.age_s


def normalise_url(url: str) -> str:
    return url.rstrip("/")
