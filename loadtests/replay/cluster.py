"""The simulated cluster a replay runs on: the simulator's engine model, one RankEngine per target,
with routing's speed seeds either as the live gateway's registry would set them or measured from
that same engine model."""

from __future__ import annotations

import functools

import msgspec

from backends.sim.engine import EngineConfig, RankEngine, ServerEngine, SimRequest
from gateway.registry import DEFAULT_DECODE_STEP_S, DEFAULT_NODE_PREFILL_TOKENS_PER_S
from gateway.routing.static import StaticWorker
from policies.types import TargetKey

__all__ = ["ClusterSpec", "ReplayCluster", "Speeds", "measure_speeds"]

MODEL = "deepseek-ai/DeepSeek-V3"


class ClusterSpec(msgspec.Struct, frozen=True, kw_only=True):
    servers: int = 4
    dp_size: int = 2
    preset: str = "h200-tp8"
    mtp: bool = False
    page_size: int = 1
    max_total_num_tokens: int | None = None
    seed: int = 0
    # Where routing's speed seeds come from: "registry" = what the gateway's registry assumes for a
    # server that does not report speeds (as the simulator and SGLang do not), so the replay sees
    # what the live gateway sees; "measured" = probed from this engine model.
    speed_seeds: str = "registry"


class Speeds(msgspec.Struct, frozen=True):
    """What one rank of the engine model does: prompt tokens prefilled per second (one long prompt
    alone), and the duration of one decode step at a moderate batch."""

    prefill_tokens_per_s: float
    decode_step_s: float


def _config(spec: ClusterSpec) -> EngineConfig:
    return EngineConfig(
        preset=spec.preset,
        mtp=spec.mtp,
        dp_size=spec.dp_size,
        page_size=spec.page_size,
        max_total_num_tokens=spec.max_total_num_tokens,
        seed=spec.seed,
    )


def _run_until_idle(rank: RankEngine, max_steps: int = 100_000) -> list[float]:
    durations: list[float] = []
    for _ in range(max_steps):
        if not rank.has_work():
            return durations
        durations.append(rank.step().duration_s)
    raise RuntimeError("engine did not drain while measuring speeds")


@functools.lru_cache(maxsize=16)
def measure_speeds(spec: ClusterSpec, prompt_tokens: int = 8192, decode_batch: int = 32) -> Speeds:
    """Probe a scratch engine in virtual time: one uncached prompt of ``prompt_tokens`` with one output
    token (prefill speed), then ``decode_batch`` short requests decoding together (step time)."""
    scratch = ServerEngine(msgspec.structs.replace(_config(spec), dp_size=1)).ranks[0]
    scratch.add(SimRequest("probe-prefill", list(range(10_000, 10_000 + prompt_tokens)), 1, ignore_eos=True))
    prefill_s = sum(_run_until_idle(scratch))
    scratch.flush_cache()
    decode_steps = 64
    for i in range(decode_batch):
        ids = [20_000 + i * 7 + j for j in range(16)]
        scratch.add(SimRequest(f"probe-decode-{i}", ids, decode_steps, ignore_eos=True))
    durations = _run_until_idle(scratch)
    # The steady middle of the run is pure decode of the whole batch.
    middle = durations[len(durations) // 4 : 3 * len(durations) // 4] or durations
    scratch.flush_cache()
    return Speeds(prompt_tokens / max(prefill_s, 1e-9), sum(middle) / len(middle))


class ReplayCluster:
    """``spec.servers`` engines of ``spec.dp_size`` ranks, addressed like the real cluster
    (``http://sim-<i>`` and a DP rank)."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        config = _config(spec)
        if spec.speed_seeds == "measured":
            speeds = measure_speeds(spec)
        elif spec.speed_seeds == "registry":
            speeds = Speeds(DEFAULT_NODE_PREFILL_TOKENS_PER_S / spec.dp_size, DEFAULT_DECODE_STEP_S)
        else:
            raise ValueError(f"speed_seeds must be 'registry' or 'measured', not {spec.speed_seeds!r}")
        self.speeds = speeds
        self.engines: list[ServerEngine] = []
        self.workers: list[StaticWorker] = []
        self.ranks: dict[TargetKey, RankEngine] = {}
        for i in range(spec.servers):
            engine = ServerEngine(msgspec.structs.replace(config, seed=spec.seed + i))
            url = f"http://sim-{i}"
            self.engines.append(engine)
            self.workers.append(
                StaticWorker(
                    url=url,
                    model=MODEL,
                    dp_size=spec.dp_size,
                    page_size=spec.page_size,
                    max_total_num_tokens=engine.max_total_num_tokens,
                    prefill_tokens_per_s=speeds.prefill_tokens_per_s,
                    decode_step_s=speeds.decode_step_s,
                )
            )
            for rank_index, rank in enumerate(engine.ranks):
                self.ranks[TargetKey(url, rank_index)] = rank

    @property
    def targets(self) -> list[TargetKey]:
        return sorted(self.ranks)
