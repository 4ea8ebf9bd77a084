"""Shapes of a Multi-head Latent Attention model (DeepSeek-V2/V3), known before weights load.

The engine reads every model config through the same attribute names (`num_layers`,
`num_heads`, `num_kv_heads`, `head_dim`, `kv_cache_spec(...)`, ...). For MLA the cache holds
one entry per token per layer, so `num_kv_heads` is 1 and `head_dim` is the entry's width,
`kv_lora_rank + num_rope_heads * qk_rope_head_dim` (512 + 64 = 576 for DeepSeek-V2).

Two extensions beyond DeepSeek's own configs serve models converted from GQA (mla_convert.py):
`num_rope_heads` (one decoupled RoPE key per original KV head; DeepSeek shares one) and
`rope_frequency_indices` (which of the original model's RoPE frequencies each layer and RoPE
head kept), plus `kv_latent_norm=False` (an SVD latent has no RMSNorm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.kv_cache.spec import KVCacheSpec, latent_attention_spec


@dataclass(frozen=True, slots=True)
class YarnScaling:
    """DeepSeek's `rope_scaling` of type yarn (HF: `_compute_yarn_parameters`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # of cos/sin; None: from mscale / mscale_all_dim


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True, slots=True)
class MLAConfig:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int  # of the dense MLP layers
    num_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    kv_lora_rank: int = 512  # c_kv: the joint K/V latent the cache keeps
    q_lora_rank: int | None = None  # None: one plain query projection (DeepSeek-V2-Lite)
    qk_nope_head_dim: int = 128  # the part of each head's key rebuilt from c_kv
    qk_rope_head_dim: int = 64  # the decoupled RoPE key, cached beside c_kv
    v_head_dim: int = 128
    num_rope_heads: int = 1  # DeepSeek: one k_pe for all heads; converted GQA: one per KV head
    kv_latent_norm: bool = True  # DeepSeek normalises c_kv (kv_a_layernorm)
    rope_interleave: bool = True  # DeepSeek rotates pairs (x0, x1), (x2, x3), ...
    rope_scaling: YarnScaling | None = None
    rope_base_dim: int = 0  # the d of theta^(-2i/d); 0: qk_rope_head_dim
    # [layer][rope head] -> indices i of the frequencies kept (partial RoPE); None: all
    rope_frequency_indices: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    tie_word_embeddings: bool = False
    # DeepSeekMoE: shared + routed experts on layers >= first_k_dense_replace (0 experts: dense)
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"  # V2 softmax; V3 sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy (V2) | noaux_tc (V3)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    converted_from: str | None = None  # the model a convert-mla folder was made from

    # The engine's view ------------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        """Heads of the cache: one latent entry per token, whatever the query heads."""
        return 1

    @property
    def rope_dim(self) -> int:
        """RoPE key values cached per token: every RoPE head's."""
        return self.num_rope_heads * self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """Width of the cached entry `[c_kv ; k_pe]`."""
        return self.kv_lora_rank + self.rope_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """DeepSeek's: 1/sqrt(qk_head_dim), times mscale^2 under YaRN (mscale_all_dim)."""
        scale = self.qk_head_dim ** -0.5
        yarn = self.rope_scaling
        if yarn is not None and yarn.mscale_all_dim:
            scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    def kv_cache_spec(self, block_size: int, kv_dtype: str, num_kv_heads: int | None = None,
                      rotate: bool = False) -> KVCacheSpec:
        """One latent entry per token; the cache has no KV heads to split into groups."""
        if num_kv_heads not in (None, 1):
            raise ValueError("a latent (MLA) cache has one entry per token and no KV heads to "
                             "split; give layer ranges only in the policy")
        return latent_attention_spec(self.kv_lora_rank, self.rope_dim, block_size, kv_dtype,
                                     rotate)


# DeepSeek-V2-Lite's attention (hidden 2048, 16 heads, kv_lora_rank 512, rope 64, nope 128,
# v 128, no query LoRA, its YaRN RoPE) with a dense MLP instead of its MoE, 4 layers, random
# weights, SmolLM2's vocabulary so the bundled tokenizer serves it.
MLA_LITE = MLAConfig(
    name="mla-lite", num_layers=4, hidden_size=2048, intermediate_size=4096, num_heads=16,
    vocab_size=49152, max_position_embeddings=16384, rope_theta=10000.0, rms_norm_eps=1e-6,
    kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, tie_word_embeddings=True,
    rope_scaling=YarnScaling(factor=40.0, original_max_position_embeddings=4096,
                             mscale=0.707, mscale_all_dim=0.707),
)

# A seeded random MLA model for fast tests: query LoRA, and a DeepSeekMoE second layer.
MLA_TINY = MLAConfig(
    name="mla-tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
    vocab_size=49152, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
    kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    tie_word_embeddings=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    moe_intermediate_size=32, first_k_dense_replace=1,
)
