"""How long one forward pass of DeepSeek-V3 takes on a preset's hardware, from first principles.

A step costs the larger of its memory time (weights it touches + KV it reads, over HBM bandwidth) and its
compute time (FLOPs over FP8 tensor throughput), plus a per-layer kernel overhead, plus its collectives (two
per layer: all-reduce after attention and after the MoE block, or all-gather/reduce-scatter with DP
attention), whose cost grows with the network round-trip time when tensor parallelism spans nodes.
docs/simulator.md derives every constant; the calibration tests pin the results to the deployment study's
measurements.
"""

from __future__ import annotations

import msgspec

from backends.sim.engine._model import DEEPSEEK_V3, ModelSpec

GB = 1e9


class GpuSpec(msgspec.Struct, frozen=True):
    name: str
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    fp8_flops: float  # dense FP8 tensor FLOP/s
    nvlink_bandwidth: float  # bytes/s, one direction, per GPU
    nic_bandwidth: float  # bytes/s per GPU for inter-node traffic and PD KV transfer (one 400 Gb/s NIC)
    # Launch/latency cost of the ~20 small kernels of one transformer layer at decode batch sizes, which no
    # bandwidth or FLOP figure captures. Fitted per GPU to the single-user decode measurements (docs).
    kernel_overhead_per_layer_s: float


H200 = GpuSpec(
    name="H200",
    hbm_bytes=141 * GB,
    hbm_bandwidth=4.8e12,
    fp8_flops=1979e12,
    nvlink_bandwidth=450 * GB,
    nic_bandwidth=50 * GB,
    kernel_overhead_per_layer_s=0.2645e-3,
)

H20 = GpuSpec(
    name="H20",
    hbm_bytes=96 * GB,
    hbm_bandwidth=4.0e12,
    fp8_flops=296e12,
    nvlink_bandwidth=450 * GB,
    nic_bandwidth=50 * GB,
    kernel_overhead_per_layer_s=0.5705e-3,
)


class Calibration(msgspec.Struct, frozen=True):
    """Efficiency constants shared by all presets (sources and fits in docs/simulator.md)."""

    # Fraction of peak HBM bandwidth that FP8 GEMV/MoE and MLA decode kernels sustain.
    hbm_efficiency: float = 0.7
    # Model FLOPs utilisation of FP8 tensor cores (DeepGEMM + FlashMLA at TP8, no EP or two-batch overlap); it
    # decides prefill speed, decode being memory bound.
    fp8_mfu: float = 0.30
    # Latency of one small-message NVLink all-reduce (SGLang's custom all-reduce, one node).
    collective_latency_s: float = 20e-6
    # Network round trips per decode step when TP spans nodes: fitted from 18.9 tok/s @ 0.193 ms and
    # 4.85 tok/s @ 2.193 ms on 2x8 H20, i.e. (1/4.85 - 1/18.9) s / 2.0 ms = 76.6 RTTs per step.
    rtt_round_trips_per_step: float = 76.64
    # MTP (EAGLE-style, SGLang's recommended DeepSeek setting): 3 draft steps, 4 tokens verified per step.
    mtp_draft_steps: int = 3
    # Probability each successive draft token is accepted (mean accepted length 1 + p + p^2 + p^3 = 2.53).
    mtp_accept_prob: float = 0.7
    # Per-step cost of speculation beyond the draft model's layers: draft/verify sampling, tree build, KV
    # moves, and losing the overlap scheduler. Fitted to the deployment study's ~1.8x at concurrency 1.
    mtp_step_overhead_s: float = 4.6e-3
    # Fixed cost of one PD KV transfer (RDMA handshake and completion polling), on top of bytes / NIC
    # bandwidth.
    pd_transfer_latency_s: float = 1e-3


class PerfModel:
    """Step durations for one DP rank of a deployment."""

    def __init__(
        self,
        *,
        gpu: GpuSpec,
        tp_size: int,
        dp_size: int,
        gpus_per_node: int,
        rtt_s: float,
        mtp: bool,
        calibration: Calibration | None = None,
        model: ModelSpec = DEEPSEEK_V3,
    ) -> None:
        if tp_size % dp_size:
            raise ValueError(f"tp_size ({tp_size}) must be divisible by dp_size ({dp_size})")
        self.gpu = gpu
        self.model = model
        self.cal = calibration or Calibration()
        self.tp_size = tp_size
        self.dp_size = dp_size
        self.attn_tp_size = tp_size // dp_size
        self.gpus_per_node = min(gpus_per_node, tp_size)
        self.num_nodes = max(1, -(-tp_size // gpus_per_node))
        self.rtt_s = rtt_s
        self.mtp = mtp
        m = model
        self._collectives_per_layer = 2
        self._eff_bw = gpu.hbm_bandwidth * self.cal.hbm_efficiency
        # Bytes each GPU reads per forward pass regardless of batch: its attention shard (whole attention when
        # DP attention gives each rank its own copy), its dense/shared/router shard and its lm_head shard.
        self._fixed_weight_bytes = (
            m.attention_params * m.weight_bytes_per_param / self.attn_tp_size
            + (m.dense_mlp_params + m.shared_expert_params + m.router_params)
            * m.weight_bytes_per_param
            / tp_size
            + m.embedding_params * m.embedding_bytes_per_param / tp_size
        )
        self._expert_bytes_per_gpu = m.expert_params * m.weight_bytes_per_param / tp_size
        self._kv_bytes_per_token = m.kv_bytes_per_token(mtp=mtp)
        self._dense_flops_per_token = 2.0 * (m.dense_mlp_params + m.shared_expert_params + m.router_params)
        self._routed_flops_per_token = 2.0 * m.moe_layers * m.experts_per_token * m.expert_params
        self._attn_proj_flops_per_token = 2.0 * m.attention_params
        self._head_flops_per_seq = 2.0 * m.embedding_params

    # -- building blocks -------------------------------------------------------------------------------------

    def _collectives_time(self, moe_tokens: float, layers: int) -> float:
        """All-reduce (or gather/scatter) of the hidden states, twice per layer."""
        count = self._collectives_per_layer * layers
        message = moe_tokens * self.model.hidden_size * 2  # bf16 activations
        p = self.gpus_per_node
        per_collective = self.cal.collective_latency_s
        if p > 1:
            per_collective += 2 * (p - 1) / p * message / self.gpu.nvlink_bandwidth
        total = count * per_collective
        if self.num_nodes > 1:
            n = self.num_nodes
            inter_bytes = 2 * (n - 1) / n * message / p  # hierarchical: each GPU ships its 1/p shard
            total += count * inter_bytes / self.gpu.nic_bandwidth
            total += self.cal.rtt_round_trips_per_step * self.rtt_s * layers / self.model.num_layers
        return total

    def _forward_time(
        self,
        *,
        rank_tokens: float,
        moe_tokens: float,
        sequences: int,
        attn_core_flops: float,
        kv_read_tokens: float,
        layers: int | None = None,
    ) -> float:
        """One forward pass: ``rank_tokens`` new tokens on this rank, ``moe_tokens`` across all DP ranks."""
        m = self.model
        n_layers = m.num_layers if layers is None else layers
        layer_share = n_layers / m.num_layers
        experts = m.distinct_experts(moe_tokens)
        weight_bytes = (
            self._fixed_weight_bytes + m.moe_layers * experts * self._expert_bytes_per_gpu
        ) * layer_share
        kv_bytes = kv_read_tokens * self._kv_bytes_per_token * layer_share
        memory_time = (weight_bytes + kv_bytes) / self._eff_bw
        flops = (
            self._attn_proj_flops_per_token * rank_tokens / self.attn_tp_size
            + (self._dense_flops_per_token + self._routed_flops_per_token) * moe_tokens / self.tp_size
        ) * layer_share
        flops += self._head_flops_per_seq * sequences / self.tp_size
        flops += attn_core_flops * layer_share / self.attn_tp_size
        compute_time = flops / (self.gpu.fp8_flops * self.cal.fp8_mfu)
        overhead = n_layers * self.gpu.kernel_overhead_per_layer_s
        return max(memory_time, compute_time) + overhead + self._collectives_time(moe_tokens, n_layers)

    # -- public step costs -----------------------------------------------------------------------------------

    def prefill_time(self, chunks: list[tuple[int, int]], other_ranks_tokens: int = 0) -> float:
        """One prefill (extend) batch: ``chunks`` are (new tokens, tokens already in KV) per request."""
        new_tokens = sum(c[0] for c in chunks)
        if new_tokens <= 0:
            return 0.0
        attn = sum(self.model.attention_core_flops(n, prefix) for n, prefix in chunks)
        kv_read = sum(n + prefix for n, prefix in chunks)
        time = self._forward_time(
            rank_tokens=new_tokens,
            moe_tokens=new_tokens + other_ranks_tokens,
            sequences=len(chunks),
            attn_core_flops=attn,
            kv_read_tokens=kv_read,
        )
        if self.mtp:
            # The draft module also extends over the prompt (one more layer's worth of work).
            time += self._forward_time(
                rank_tokens=new_tokens,
                moe_tokens=new_tokens + other_ranks_tokens,
                sequences=len(chunks),
                attn_core_flops=attn / self.model.num_layers,
                kv_read_tokens=kv_read / self.model.num_layers,
                layers=1,
            )
        return time

    @property
    def tokens_verified_per_step(self) -> int:
        return 1 + self.cal.mtp_draft_steps if self.mtp else 1

    def decode_time(self, batch_size: int, kv_tokens: int, other_ranks_batch: int = 0) -> float:
        """One decode step for ``batch_size`` requests holding ``kv_tokens`` tokens of KV in total."""
        if batch_size <= 0:
            return 0.0
        per_req = self.tokens_verified_per_step
        rank_tokens = batch_size * per_req
        moe_tokens = (batch_size + other_ranks_batch) * per_req
        attn = (
            2.0
            * self.model.num_layers
            * self.model.num_heads
            * (self.model.kv_lora_rank * 2 + self.model.qk_rope_head_dim)
            * kv_tokens
            * per_req
        )
        time = self._forward_time(
            rank_tokens=rank_tokens,
            moe_tokens=moe_tokens,
            sequences=batch_size * per_req,
            attn_core_flops=attn,
            kv_read_tokens=kv_tokens,
        )
        if self.mtp:
            draft_moe = batch_size + other_ranks_batch
            one_draft = self._forward_time(
                rank_tokens=batch_size,
                moe_tokens=draft_moe,
                sequences=batch_size,
                attn_core_flops=attn / per_req / self.model.num_layers,
                kv_read_tokens=kv_tokens / self.model.num_layers,
                layers=1,
            )
            time += self.cal.mtp_draft_steps * one_draft + self.cal.mtp_step_overhead_s
        return time

    def expected_accept_length(self) -> float:
        if not self.mtp:
            return 1.0
        p = self.cal.mtp_accept_prob
        return sum(p**i for i in range(self.cal.mtp_draft_steps + 1))

    def kv_transfer_time(self, tokens: int) -> float:
        """PD: time to receive ``tokens`` tokens of KV over this rank's NIC."""
        return self.cal.pd_transfer_latency_s + tokens * self._kv_bytes_per_token / self.gpu.nic_bandwidth

    @property
    def kv_bytes_per_token(self) -> int:
        return self._kv_bytes_per_token

    def weight_bytes_per_gpu(self) -> float:
        """Resident weights on one GPU: its share of everything, plus a full attention copy per DP rank."""
        m = self.model
        everything = m.total_weight_bytes + (m.mtp_params * m.weight_bytes_per_param if self.mtp else 0)
        attention = m.attention_params * m.weight_bytes_per_param
        return (everything - attention) / self.tp_size + attention / self.attn_tp_size
