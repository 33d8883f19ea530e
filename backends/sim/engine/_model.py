"""DeepSeek-V3's architecture (config.json of deepseek-ai/DeepSeek-V3) and the sizes derived from it.

Every number the performance model uses about the *model* comes from here; the parameter counts are computed,
not typed in, and the tests check they land on the published 671B total / 37B activated.
"""

from __future__ import annotations

import msgspec


class ModelSpec(msgspec.Struct, frozen=True):
    hidden_size: int = 7168
    num_layers: int = 61
    first_k_dense_layers: int = 3
    dense_intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    routed_experts: int = 256
    experts_per_token: int = 8
    shared_experts: int = 1
    vocab_size: int = 129280
    num_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # Multi-token prediction: one extra transformer block (MoE) fed by an [embedding; hidden] projection.
    mtp_modules: int = 1
    # SGLang keeps the KV cache in the model dtype (bf16) unless --kv-cache-dtype fp8_e4m3 is given.
    kv_cache_bytes_per_value: int = 2
    # FP8 checkpoint: linear weights are 1 byte; embedding and lm_head stay bf16.
    weight_bytes_per_param: int = 1
    embedding_bytes_per_param: int = 2

    # -- parameter counts ------------------------------------------------------------------------------------

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_layers

    @property
    def expert_params(self) -> int:
        """One routed (or shared) expert: gate, up and down projections."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def attention_params_per_layer(self) -> int:
        """MLA: q down/up, kv down (latent + rope key), kv up, output projection."""
        h = self.hidden_size
        qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk_head
        kv_down = h * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_up = self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
        out = self.num_heads * self.v_head_dim * h
        return q + kv_down + kv_up + out

    @property
    def attention_params(self) -> int:
        return self.num_layers * self.attention_params_per_layer

    @property
    def dense_mlp_params(self) -> int:
        return self.first_k_dense_layers * 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def shared_expert_params(self) -> int:
        return self.moe_layers * self.shared_experts * self.expert_params

    @property
    def router_params(self) -> int:
        return self.moe_layers * self.routed_experts * self.hidden_size

    @property
    def routed_expert_params(self) -> int:
        return self.moe_layers * self.routed_experts * self.expert_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Main model only (the MTP module is extra, as in the 671B figure)."""
        return (
            self.attention_params
            + self.dense_mlp_params
            + self.shared_expert_params
            + self.router_params
            + self.routed_expert_params
            + 2 * self.embedding_params
        )

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through (the embedding is a lookup, so only lm_head counts)."""
        routed = self.moe_layers * self.experts_per_token * self.expert_params
        return (
            self.attention_params
            + self.dense_mlp_params
            + self.shared_expert_params
            + self.router_params
            + routed
            + self.embedding_params
        )

    @property
    def mtp_params(self) -> int:
        """One MTP module: an [emb; hidden] -> hidden projection and one MoE block (embedding/head shared)."""
        block = (
            self.attention_params_per_layer + (self.routed_experts + self.shared_experts) * self.expert_params
        )
        return 2 * self.hidden_size * self.hidden_size + block

    # -- bytes -----------------------------------------------------------------------------------------------

    @property
    def total_weight_bytes(self) -> int:
        non_embedding = self.total_params - 2 * self.embedding_params
        return (
            non_embedding * self.weight_bytes_per_param
            + 2 * self.embedding_params * self.embedding_bytes_per_param
        )

    @property
    def kv_values_per_token_per_layer(self) -> int:
        """MLA caches the compressed latent and the shared rope key: 512 + 64 = 576 values."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def kv_bytes_per_token(self, *, mtp: bool = False) -> int:
        """KV bytes one token occupies across all layers (plus the MTP layer's pool when MTP is on)."""
        layers = self.num_layers + (self.mtp_modules if mtp else 0)
        return self.kv_values_per_token_per_layer * layers * self.kv_cache_bytes_per_value

    def distinct_experts(self, tokens: float) -> float:
        """Expected routed experts a batch of ``tokens`` touches in one MoE layer, assuming uniform routing.

        Each token picks ``experts_per_token`` of ``routed_experts``; an expert stays untouched with
        probability (1 - k/E)^n. One token touches 8, four touch ~30, 128 touch ~252 of 256.
        """
        if tokens <= 0:
            return 0.0
        miss = 1.0 - self.experts_per_token / self.routed_experts
        return float(self.routed_experts * (1.0 - miss**tokens))

    def attention_core_flops(self, new_tokens: int, prefix_tokens: int) -> float:
        """Score and value FLOPs of ``new_tokens`` causal tokens after ``prefix_tokens`` (all layers).

        Prefill runs MLA in its expanded multi-head form: per head a 192-wide q.k and a 128-wide p.v per pair.
        """
        if new_tokens <= 0:
            return 0.0
        pairs = new_tokens * prefix_tokens + new_tokens * (new_tokens + 1) / 2
        per_pair = 2 * self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
        return float(self.num_layers * per_pair * pairs)


DEEPSEEK_V3 = ModelSpec()
