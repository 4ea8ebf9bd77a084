"""DeepSeek-V2/V3 (Multi-head Latent Attention) over a paged latent cache, read top to bottom.

Like llama.py, one engine step is one flat sequence of T tokens and only attention looks at
request boundaries. Per layer, the attention block computes:

    query    q = W_q x  or  W_qb RMSNorm(W_qa x)            (T, H, Dn + Dr)  nope | rope
    latent   [c_kv ; k_pe] = W_kv_a x;  c_kv <- RMSNorm(c_kv)  (T, R + Hr * Dr)
    RoPE     on q's last Dr dims and on k_pe (mla_rope.py)
    cache    stores [c_kv ; k_pe]: 576 values per token for DeepSeek-V2 (R 512, Dr 64)
    attend   through the latent (engine/attention/mla.py, absorbed or expanded) -> (T, H, Dv)

The query projection (or its LoRA down-projection) and W_kv_a read the same input, so their
weights are fused into one `in_proj` (one matmul per layer instead of two). MLPs are dense
or DeepSeekMoE (moe.py) as the config says.

Shapes: T tokens, C hidden, H heads, R kv_lora_rank, Dn/Dr/Dv nope/rope/value head dims,
Hr RoPE heads (1 for DeepSeek), V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention.layer import Attention
from engine.attention.metadata import AttentionMetadata
from engine.attention.mla_paged import LatentProjections
from engine.kv_cache.spec import KVCacheSpec
from engine.models import mla_rope
from engine.models.llama import linear
from engine.models.mla_config import MLAConfig
from engine.models.moe import GatedMLP, MoE

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a / kv_a RMSNorms use the default, not rms_norm_eps


class LatentAttention(nn.Module):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.config = config
        c, h = config, config.num_heads
        self.q_width = c.q_lora_rank or h * c.qk_head_dim  # q's part of in_proj
        self.in_proj = nn.Linear(c.hidden_size, self.q_width + c.head_dim, bias=False)
        if c.q_lora_rank:
            self.q_a_layernorm = nn.RMSNorm(c.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * c.qk_head_dim, bias=False)
        if c.kv_latent_norm:
            self.kv_a_layernorm = nn.RMSNorm(c.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(h * c.v_head_dim, c.hidden_size, bias=False)
        self._up: LatentProjections | None = None

    @property
    def up(self) -> LatentProjections:
        """W_UK / W_UV from kv_b_proj, rebuilt whenever the weight tensor is replaced."""
        if self._up is None or self._up.kv_b is not self.kv_b_proj.weight:
            c = self.config
            self._up = LatentProjections.from_kv_b(self.kv_b_proj.weight, c.num_heads,
                                                   c.qk_nope_head_dim, c.v_head_dim,
                                                   c.num_rope_heads)
        return self._up

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: Attention, metadata: list[AttentionMetadata]) -> torch.Tensor:
        """x (T, C), cos/sin (T, Hr, Dr/2) -> (T, C)."""
        c, t, h = self.config, x.shape[0], self.config.num_heads
        dn, dr, r, hr = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.num_rope_heads
        fused = linear(x, self.in_proj.weight)  # (T, q_width + R + Hr * Dr)
        q, c_kv, k_pe = fused.split([self.q_width, r, hr * dr], dim=-1)
        if c.q_lora_rank:
            q = linear(self.q_a_layernorm(q), self.q_b_proj.weight)
        q = q.view(t, h, dn + dr)  # (T, H, Dn + Dr)
        if c.kv_latent_norm:
            c_kv = self.kv_a_layernorm(c_kv)  # (T, R)
        # query head j * (H / Hr) + i meets RoPE head j, as GQA's heads meet their KV head
        q_cos, q_sin = (a.repeat_interleave(h // hr, dim=1) for a in (cos, sin))
        q_pe = mla_rope.rotate(q[..., dn:], q_cos, q_sin, c.rope_interleave)  # (T, H, Dr)
        k_pe = mla_rope.rotate(k_pe.view(t, hr, dr), cos, sin, c.rope_interleave)  # (T, Hr, Dr)
        q = torch.cat((q[..., :dn], q_pe), dim=-1)  # (T, H, Dn + Dr)
        latent = torch.cat((c_kv, k_pe.reshape(t, hr * dr)), dim=-1)  # (T, W)
        out = attention.forward_latent(q, latent, self.up, metadata)  # (T, H, Dv)
        return linear(out.reshape(t, h * c.v_head_dim), self.o_proj.weight)  # (T, C)


class DecoderLayer(nn.Module):
    def __init__(self, config: MLAConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = LatentAttention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = (MoE(config) if config.is_moe_layer(layer) else
                    GatedMLP(config.hidden_size, config.intermediate_size))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: Attention, metadata: list[AttentionMetadata]) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attention, metadata)  # (T, C)
        return x + self.mlp(self.mlp_norm(x))  # (T, C)


class DeepseekV2(nn.Module):
    """Decoder-only MLA model. RoPE frequencies are an fp32 buffer (layers, Hr, Dr/2), not in
    the state dict; angles are computed from each token's absolute position every step."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings else
                        nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.register_buffer("rope_inv_freq", mla_rope.inv_freq(config), persistent=False)
        self.rope_scale = mla_rope.attention_factor(config)
        # DeepSeek's frequencies are the same in every layer: one cos/sin per step serves all
        self.shared_rope = config.rope_frequency_indices is None

    def reset_rope(self, device: torch.device) -> None:
        """Recompute the fp32 frequencies (after building on the meta device, or a cast)."""
        self.rope_inv_freq = mla_rope.inv_freq(self.config).to(device)

    @property
    def attention_scale(self) -> float:
        return self.config.softmax_scale

    def kv_cache_spec(self, block_size: int, kv_dtype: str) -> KVCacheSpec:
        return self.config.kv_cache_spec(block_size, kv_dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: list[AttentionMetadata], attention: list[Attention]) -> torch.Tensor:
        """input_ids, positions (T,) -> final hidden states (T, C), normed."""
        x = self.embed_tokens(input_ids)  # (T, C)
        rope = None
        for layer in self.layers:
            if rope is None or not self.shared_rope:
                rope = mla_rope.cos_sin(positions, self.rope_inv_freq[layer.layer],
                                        self.rope_scale)  # (T, Hr, Dr/2) each
            x = layer(x, *rope, attention[layer.layer], metadata)  # (T, C)
        return self.norm(x)  # (T, C)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, C) -> fp32 logits (N, V)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight).float()  # (N, V)
