"""DeepSeek's decoupled RoPE: frequencies (plain, YaRN, or a kept subset) and the rotation.

Only the `qk_rope_head_dim` dims of each query head and the cached `k_pe` rotate. DeepSeek lays
them out as interleaved pairs (x0, x1), (x2, x3), ... each turned by one frequency
(transformers' `apply_rotary_emb` views them as complex numbers); V3 may also use the
half-split layout of Llama (`rope_interleave=False`).

Frequencies are per layer and RoPE head, `(layers, rope_heads, rope_dim / 2)`: DeepSeek's are
all equal, a model converted by partial RoPE keeps a different subset in every layer and KV
head. Angles are computed per step from the positions (`position * inv_freq` in fp32, as
transformers does), not looked up in tables: subsets would make a table per layer.
"""

from __future__ import annotations

import math

import torch

from engine.models.mla_config import MLAConfig, YarnScaling, yarn_mscale


def _yarn_inv_freq(base: float, dim: int, yarn: YarnScaling) -> torch.Tensor:
    """transformers' `_compute_yarn_parameters` (truncate=True), fp32 (dim/2,)."""
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(yarn.original_max_position_embeddings
                               / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (yarn.factor * pos_freqs)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies keep their speed)
    return interpolation * (1 - keep) + extrapolation * keep


def attention_factor(config: MLAConfig) -> float:
    """YaRN's factor on cos/sin (1.0 for DeepSeek's mscale == mscale_all_dim)."""
    yarn = config.rope_scaling
    if yarn is None:
        return 1.0
    if yarn.attention_factor is not None:
        return yarn.attention_factor
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor,
                                                                   yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)


def inv_freq(config: MLAConfig) -> torch.Tensor:
    """(layers, rope_heads, qk_rope_head_dim / 2) fp32 frequencies."""
    dim = config.rope_base_dim or config.qk_rope_head_dim
    if config.rope_scaling is not None:
        base = _yarn_inv_freq(config.rope_theta, dim, config.rope_scaling)
    else:
        base = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    half, shape = config.qk_rope_head_dim // 2, (config.num_layers, config.num_rope_heads)
    if config.rope_frequency_indices is None:
        return base[:half].expand(*shape, half).contiguous()
    index = torch.tensor(config.rope_frequency_indices, dtype=torch.int64)  # (L, Hr, Dr/2)
    if tuple(index.shape) != (*shape, half):
        raise ValueError(f"rope_frequency_indices has shape {tuple(index.shape)}, expected "
                         f"{(*shape, half)} (layers, rope heads, rope dims / 2)")
    return base[index]


def cos_sin(positions: torch.Tensor, freqs: torch.Tensor, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,), freqs (Hr, Dr/2) -> cos, sin (T, Hr, Dr/2) in fp32."""
    angles = positions.float()[:, None, None] * freqs  # (T, Hr, Dr/2)
    return angles.cos() * scale, angles.sin() * scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
           ) -> torch.Tensor:
    """x (T, heads, Dr) turned by cos/sin (T, heads or 1, Dr/2), in fp32, back to x's dtype."""
    xf = x.float()
    if interleave:
        pairs = xf.unflatten(-1, (-1, 2))  # (T, heads, Dr/2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = xf.chunk(2, dim=-1)  # (T, heads, Dr/2) each
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return out.to(x.dtype)  # (T, heads, Dr)
