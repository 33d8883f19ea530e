"""Deployments the simulator can pretend to be, and the configuration an engine is built from."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

import msgspec

from backends.sim.engine._perf import H20, H200, GpuSpec

DisaggregationMode = Literal["null", "prefill", "decode"]


class Preset(msgspec.Struct, frozen=True):
    name: str
    description: str
    gpu: GpuSpec
    num_gpus: int
    gpus_per_node: int
    tp_size: int
    # DP attention ranks (1 = plain tensor parallelism); EngineConfig.dp_size overrides.
    dp_size: int
    # Network round trip between nodes, ms (only matters when TP spans nodes); EngineConfig.rtt_ms overrides.
    rtt_ms: float
    # Share of HBM SGLang leaves outside the static pool (activations, CUDA graphs): 1 - mem_fraction_static.
    activation_reserve_fraction: float = 0.10
    # SGLang's defaults for >80 GB GPUs; with DP attention the chunk is divided by dp_size (as SGLang does).
    chunked_prefill_size: int = 8192
    max_prefill_tokens: int = 16384


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "h200-tp8": Preset(
            name="h200-tp8",
            description="8x H200 (141 GB) in one node, TP8",
            gpu=H200,
            num_gpus=8,
            gpus_per_node=8,
            tp_size=8,
            dp_size=1,
            rtt_ms=0.0,
        ),
        "h200-dp8": Preset(
            name="h200-dp8",
            description="8x H200 (141 GB) in one node, TP8 with DP attention (dp 8)",
            gpu=H200,
            num_gpus=8,
            gpus_per_node=8,
            tp_size=8,
            dp_size=8,
            rtt_ms=0.0,
        ),
        "h20-tp16": Preset(
            name="h20-tp16",
            description="16x H20 (96 GB) over two nodes, TP16",
            gpu=H20,
            num_gpus=16,
            gpus_per_node=8,
            tp_size=16,
            dp_size=1,
            rtt_ms=0.193,
        ),
    }
)


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How to build a :class:`ServerEngine`; ``None`` means "derive from the preset as SGLang would"."""

    preset: str = "h200-tp8"
    mtp: bool = False
    dp_size: int | None = None
    page_size: int = 1
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None
    max_total_num_tokens: int | None = None
    context_length: int = 163840
    rtt_ms: float | None = None
    disaggregation_mode: DisaggregationMode = "null"
    seed: int = 0
    max_prefill_tokens: int | None = None
    disable_radix_cache: bool = False
    # SGLang's --schedule-conservativeness (default 1.0; multiplied by 0.3 under DP attention).
    schedule_conservativeness: float | None = None
    # The model ends answers with EOS at a deterministic, prompt-dependent length (unless ignore_eos).
    natural_stop: bool = True
