"""KV bytes per token of one attention shape cached three ways: MHA, GQA and MLA.

For the MLA page and bench/mla_decode.py: the formula (elements x bytes, from the DeepSeek-V2
paper's Table 1: MHA 2 n_h d_h, GQA 2 n_g d_h, MLA d_c + d_R per token per layer) beside the
bytes of a cache really allocated from the same specs the engine uses (on the meta device: no
memory is touched), so the page shows that the engine's storage is what the formula says.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.spec import DTYPE_BYTES, full_attention_spec, latent_attention_spec

KINDS = ("MHA", "GQA", "MLA")


@dataclass(frozen=True, slots=True)
class AttentionShape:
    name: str
    num_layers: int
    num_heads: int
    head_dim: int  # d_h of K and V under MHA / GQA
    num_kv_heads: int  # n_g of the GQA equivalent
    kv_lora_rank: int  # d_c
    rope_dim: int  # d_R: cached RoPE values (every RoPE head's)

    def elements(self, kind: str) -> int:
        """Cached values per token per layer (the paper's formulas)."""
        if kind == "MHA":
            return 2 * self.num_heads * self.head_dim
        if kind == "GQA":
            return 2 * self.num_kv_heads * self.head_dim
        return self.kv_lora_rank + self.rope_dim

    def formula_bytes(self, kind: str, kv_dtype: str = "bf16") -> int:
        """Bytes per token per layer in a float format."""
        return self.elements(kind) * DTYPE_BYTES[kv_dtype]

    def spec(self, kind: str, kv_dtype: str, block_size: int = 16):
        if kind == "MLA":
            return latent_attention_spec(self.kv_lora_rank, self.rope_dim, block_size, kv_dtype)
        heads = self.num_heads if kind == "MHA" else self.num_kv_heads
        return full_attention_spec(heads, self.head_dim, block_size, kv_dtype)

    def measured_bytes(self, kind: str, kv_dtype: str = "bf16", block_size: int = 16) -> float:
        """Bytes per token per layer of a cache allocated (on the meta device) from the spec
        the engine would use: storage bytes / token slots / layers."""
        from engine.kv_cache.layout import make_groups, parse_policy
        from engine.kv_cache.storage import PagedKVCache

        spec = self.spec(kind, kv_dtype, block_size)
        heads = spec.num_kv_heads
        groups = make_groups(parse_policy("full", self.num_layers, heads), lambda _: spec)
        cache = PagedKVCache(groups, num_blocks=3, device="meta")
        return cache.allocated_bytes_per_token / self.num_layers


def smollm2_mla(rank: int, rope_dims: int) -> AttentionShape:
    """SmolLM2 converted by `cli.py convert-mla --rank R --rope-dims D`."""
    return AttentionShape(f"SmolLM2 as MLA (rank {rank}, RoPE 3 x {rope_dims})", 30, 9, 64, 3,
                          rank, 3 * rope_dims)


SHAPES = {s.name: s for s in (
    # DeepSeek-V2 (236B): 60 layers, 128 heads of 128; GQA with DeepSeek 67B's 8 groups
    AttentionShape("DeepSeek-V2", 60, 128, 128, 8, 512, 64),
    AttentionShape("DeepSeek-V2-Lite", 27, 16, 128, 4, 512, 64),
    AttentionShape("mla-lite (this lab's preset)", 4, 16, 128, 4, 512, 64),
    # SmolLM2's own cache is the GQA column (3 KV heads); its MLA column is the lossless
    # conversion at RoPE 16 (rank 336 + 48 = 384 values, as GQA)
    AttentionShape("SmolLM2-135M", 30, 9, 64, 3, 336, 48),
    smollm2_mla(64, 16), smollm2_mla(128, 16), smollm2_mla(192, 64),
)}

# The DeepSeek-V2 paper (arXiv 2405.04434), as published
PAPER = {
    "elements_per_token_per_layer": {"MLA": 576, "MHA": 2 * 128 * 128},
    "kv_cache_reduction_vs_deepseek_67b": 0.933,
    "max_generation_throughput_vs_deepseek_67b": 5.76,
}
