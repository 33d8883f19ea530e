"""The simulated DeepSeek-V3 SGLang engine: tokenizer stand-in, chat template, radix cache, scheduler, perf
model.

Pure: no I/O, no asyncio, no clock reads. A server (or a virtual-time replay) calls ``RankEngine.step()``,
waits the returned ``duration_s`` (scaled real time, or advanced virtual time), then delivers the events.
See docs/simulator.md for the model and the source of every constant.
"""

from backends.sim.engine._chat import render_chat
from backends.sim.engine._model import DEEPSEEK_V3, ModelSpec
from backends.sim.engine._perf import Calibration, GpuSpec, PerfModel
from backends.sim.engine._presets import PRESETS, DisaggregationMode, EngineConfig, Preset
from backends.sim.engine._radix import RadixCache
from backends.sim.engine._rank import RankEngine
from backends.sim.engine._server import ServerEngine
from backends.sim.engine._tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    BOS_TOKEN_ID,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    SPECIAL_TOKENS,
    USER_TOKEN,
    VOCAB_SIZE,
    Tokenizer,
)
from backends.sim.engine._types import (
    Event,
    FinishReason,
    PrefilledKV,
    RankLoad,
    RequestFinished,
    RequestScheduled,
    SimRequest,
    StepResult,
    TokensGenerated,
)
from backends.sim.engine._virtual import RequestTiming, run_closed_loop, run_closed_loop_server

__all__ = [
    "ASSISTANT_TOKEN",
    "BOS_TOKEN",
    "BOS_TOKEN_ID",
    "DEEPSEEK_V3",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "PRESETS",
    "SPECIAL_TOKENS",
    "USER_TOKEN",
    "VOCAB_SIZE",
    "Calibration",
    "DisaggregationMode",
    "EngineConfig",
    "Event",
    "FinishReason",
    "GpuSpec",
    "ModelSpec",
    "PerfModel",
    "PrefilledKV",
    "Preset",
    "RadixCache",
    "RankEngine",
    "RankLoad",
    "RequestFinished",
    "RequestScheduled",
    "RequestTiming",
    "ServerEngine",
    "SimRequest",
    "StepResult",
    "Tokenizer",
    "TokensGenerated",
    "render_chat",
    "run_closed_loop",
    "run_closed_loop_server",
]
