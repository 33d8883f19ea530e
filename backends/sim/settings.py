"""Start-up settings of one simulated server (the sim's stand-in for SGLang's ServerArgs) and its faults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import msgspec

from backends.sim.engine import DisaggregationMode

DEFAULT_MODEL_PATH = "deepseek-ai/DeepSeek-V3"
ROLES = ("null", "prefill", "decode")
LOAD_BALANCE_METHODS = ("auto", "round_robin", "follow_bootstrap_room", "total_requests", "total_tokens")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything a server needs to know at start-up; resolved once, read per request."""

    host: str = "127.0.0.1"
    port: int = 0
    dp_size: int | None = None  # None => the preset's
    preset: str = "h200-tp8"
    mtp: bool = False
    disaggregation_mode: DisaggregationMode = "null"
    disaggregation_bootstrap_port: int = 8998
    time_scale: float = 1.0
    enable_cache_report: bool = False
    enable_metrics: bool = False
    model_path: str = DEFAULT_MODEL_PATH
    served_model_name: str | None = None
    sglang_version: str | None = None
    page_size: int = 1
    max_running_requests: int | None = None
    max_total_num_tokens: int | None = None
    chunked_prefill_size: int | None = None
    max_prefill_tokens: int | None = None
    disable_radix_cache: bool = False
    load_balance_method: str = (
        "auto"  # auto | round_robin | follow_bootstrap_room | total_requests | total_tokens
    )
    context_length: int = 163840
    rtt_ms: float | None = None
    api_key: str | None = None
    incremental_streaming_output: bool = False
    stream_interval: int = 1
    stream_response_default_include_usage: bool = False
    bootstrap_timeout_s: float = field(
        default_factory=lambda: _env_float("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300.0)
    )
    waiting_timeout_s: float = field(
        default_factory=lambda: _env_float("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", 300.0)
    )
    health_check_timeout_s: float = field(
        default_factory=lambda: _env_float("SGLANG_HEALTH_CHECK_TIMEOUT", 20.0)
    )
    # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0: /health answers 200 without running a generate.
    health_runs_generate: bool = field(
        default_factory=lambda: (
            os.environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "1").lower() not in ("0", "false")
        )
    )
    startup_delay_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.disaggregation_mode not in ROLES:
            raise ValueError(f"disaggregation_mode must be one of {ROLES}, got {self.disaggregation_mode!r}")
        if self.dp_size is not None and self.dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        if self.time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        if self.load_balance_method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"load_balance_method must be one of {LOAD_BALANCE_METHODS}")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path

    @property
    def role(self) -> str:
        """The cluster vocabulary: regular | prefill | decode."""
        return "regular" if self.disaggregation_mode == "null" else self.disaggregation_mode


class Faults(msgspec.Struct, kw_only=True):
    """Injected misbehaviour of one server; changed at run time through /sim/faults or `SimServer.faults`.

    latency_ms          extra delay before a generation request is admitted
    error_rate          fraction of generation requests refused with SGLang's queue-full 503
    hang                generation requests never get their first byte while set
    drop_after_chunks   streams are cut (socket closed) after this many chunks; non-streams close unanswered
    refuse_connections  the server stops listening (clients get ECONNREFUSED) while set
    refuse_for_s        with refuse_connections: listen again after this many seconds (0 = until cleared)
    reset_connections   new connections are accepted and reset at once (RST) while set
    slowdown            multiplies every scheduler step's duration
    """

    latency_ms: float = 0.0
    error_rate: float = 0.0
    hang: bool = False
    drop_after_chunks: int | None = None
    refuse_connections: bool = False
    refuse_for_s: float = 0.0
    reset_connections: bool = False
    slowdown: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be in [0, 1]")
        if self.latency_ms < 0 or self.refuse_for_s < 0:
            raise ValueError("latency_ms and refuse_for_s must be >= 0")
        if self.slowdown <= 0:
            raise ValueError("slowdown must be > 0")
        if self.drop_after_chunks is not None and self.drop_after_chunks < 0:
            raise ValueError("drop_after_chunks must be >= 0")
