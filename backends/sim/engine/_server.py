"""A whole SGLang server: its DP ranks, built from an EngineConfig the way SGLang sizes itself at start-up."""

from __future__ import annotations

from backends.sim.engine._perf import PerfModel
from backends.sim.engine._presets import PRESETS, EngineConfig, Preset
from backends.sim.engine._rank import RankEngine
from backends.sim.engine._textgen import TextGenerator
from backends.sim.engine._tokenizer import Tokenizer

# SGLang's req_to_token pool: min(max(tokens / context_len * 512, 2048), 4096) request slots per rank.
_MIN_REQ_SLOTS = 2048
_MAX_REQ_SLOTS = 4096
# SGLang resets max_running_requests to 48 when speculative decoding (EAGLE/MTP) is on and none is given.
_SPECULATIVE_MAX_RUNNING = 48


class ServerEngine:
    """All DP ranks of one simulated server. Pure; each rank is stepped by the caller."""

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        preset = PRESETS.get(config.preset)
        if preset is None:
            raise ValueError(f"unknown preset {config.preset!r}; choose one of {sorted(PRESETS)}")
        dp_size = preset.dp_size if config.dp_size is None else config.dp_size
        if dp_size < 1 or preset.tp_size % dp_size:
            raise ValueError(f"dp_size must divide tp_size {preset.tp_size} (got {dp_size})")
        if config.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if config.context_length < 2:
            raise ValueError("context_length must be >= 2")
        self.config = config
        self.preset: Preset = preset
        self.dp_size = dp_size
        self.tp_size = preset.tp_size
        self.enable_dp_attention = dp_size > 1
        self.page_size = config.page_size
        self.context_length = config.context_length
        self.disaggregation_mode = config.disaggregation_mode
        rtt_ms = preset.rtt_ms if config.rtt_ms is None else config.rtt_ms
        if rtt_ms < 0:
            raise ValueError("rtt_ms must be >= 0")
        self.rtt_ms = rtt_ms
        self.perf = PerfModel(
            gpu=preset.gpu,
            tp_size=preset.tp_size,
            dp_size=dp_size,
            gpus_per_node=preset.gpus_per_node,
            rtt_s=rtt_ms / 1e3,
            mtp=config.mtp,
        )
        self.tokenizer = tokenizer or Tokenizer()

        # KV pool per rank: what HBM has left after this GPU's weights and the activation reserve, over the
        # bytes one token's MLA cache takes. Every GPU of an attention group holds the whole latent cache.
        gpu = preset.gpu
        self.weight_bytes_per_gpu = self.perf.weight_bytes_per_gpu()
        self.kv_cache_bytes_per_gpu = gpu.hbm_bytes * (1 - preset.activation_reserve_fraction) - (
            self.weight_bytes_per_gpu
        )
        derived_tokens = int(self.kv_cache_bytes_per_gpu // self.perf.kv_bytes_per_token)
        tokens = config.max_total_num_tokens if config.max_total_num_tokens is not None else derived_tokens
        tokens -= tokens % self.page_size
        if tokens < 2 * self.page_size or tokens < 16:
            raise ValueError(f"max_total_num_tokens too small ({tokens})")
        self.max_total_num_tokens = tokens

        if config.max_running_requests is not None:
            if config.max_running_requests < 1:
                raise ValueError("max_running_requests must be >= 1")
            running = max(1, config.max_running_requests // dp_size)
        elif config.mtp:
            running = max(1, _SPECULATIVE_MAX_RUNNING // dp_size)
        else:
            slots = min(max(int(tokens / config.context_length * 512), _MIN_REQ_SLOTS), _MAX_REQ_SLOTS)
            running = min(tokens // 2, slots)
        self.max_running_requests = running  # per rank

        chunk: int | None = (
            config.chunked_prefill_size
            if config.chunked_prefill_size is not None
            else preset.chunked_prefill_size
        )
        if chunk is not None and chunk > 0 and self.enable_dp_attention:
            # SGLang divides the (server-wide) chunk by dp_size under DP attention, given or defaulted alike.
            chunk = max(self.page_size, chunk // dp_size)
        if chunk is not None and chunk <= 0:
            chunk = None  # SGLang: -1 disables chunked prefill
        if chunk is not None and chunk < self.page_size:
            raise ValueError("chunked_prefill_size must be >= page_size")
        self.chunked_prefill_size = chunk
        self.max_prefill_tokens = (
            config.max_prefill_tokens if config.max_prefill_tokens is not None else preset.max_prefill_tokens
        )
        if self.max_prefill_tokens < self.page_size:
            raise ValueError("max_prefill_tokens must be >= page_size")

        conservativeness = (
            1.0 if config.schedule_conservativeness is None else config.schedule_conservativeness
        )
        if conservativeness < 0:
            raise ValueError("schedule_conservativeness must be >= 0")
        # SGLang multiplies it by 0.3 under DP attention (server_args), admitting more eagerly per rank.
        self.schedule_conservativeness = conservativeness * (0.3 if self.enable_dp_attention else 1.0)

        text = TextGenerator(self.tokenizer, seed=config.seed, natural_stop=config.natural_stop)
        self.ranks: list[RankEngine] = [
            RankEngine(
                dp_rank=rank,
                perf=self.perf,
                text=text,
                max_total_num_tokens=tokens,
                max_running_requests=running,
                chunked_prefill_size=chunk,
                max_prefill_tokens=self.max_prefill_tokens,
                page_size=self.page_size,
                context_length=config.context_length,
                disaggregation_mode=config.disaggregation_mode,
                disable_radix_cache=config.disable_radix_cache,
                schedule_conservativeness=self.schedule_conservativeness,
                others_batch_tokens=self._others_batch_tokens if dp_size > 1 else None,
            )
            for rank in range(dp_size)
        ]
        self._next_rank = 0

    def _others_batch_tokens(self, rank: RankEngine) -> int:
        """Tokens the other DP ranks push through the shared MoE layers (lock-step on real GPUs)."""
        return sum(r.last_batch_tokens for r in self.ranks if r is not rank and r.has_work())

    def pick_rank(self) -> int:
        """SGLang's default DP load balancing for a regular server: round robin."""
        rank = self._next_rank
        self._next_rank = (rank + 1) % self.dp_size
        return rank

    @property
    def max_req_input_len(self) -> int:
        return self.ranks[0].max_req_input_len

    def nominal_prefill_tokens_per_s(self, chunk_tokens: int | None = None) -> float:
        """Prefill speed of one rank on a full chunk with nothing cached (a routing speed seed)."""
        tokens = chunk_tokens or self.chunked_prefill_size or self.max_prefill_tokens
        return tokens / self.perf.prefill_time([(tokens, 0)])

    def nominal_decode_step_s(self, batch_size: int = 1, context_tokens: int = 2048) -> float:
        """Duration of one decode step of ``batch_size`` requests of ``context_tokens`` each (speed seed)."""
        return self.perf.decode_time(batch_size, batch_size * context_tokens)
