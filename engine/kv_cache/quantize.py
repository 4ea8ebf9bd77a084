"""Quantizing full KV blocks, and reading them back (KIVI's scheme; fp8 as vLLM stores it).

INT8 / INT4 (KIVI, asymmetric: a scale and a zero point, here the group's minimum):
- keys per channel over the tokens of a block: each (head, channel) gets a scale and minimum
  from its range across the block's `block_size` tokens. Outlier channels of K then cost only
  their own precision, which is why KIVI groups keys this way;
- values per token over groups of `group` channels.
`q = round((x - min) / scale)` in 0..2^bits-1, `x ~ q * scale + min`; scale and min in fp16
(a float minimum, not an integer zero point: a channel whose values are all far from 0 keeps
its full resolution). INT4 packs two values a byte along the channel axis (low nibble first).
FP8: e4m3 with one scale per tensor, 1.0 (vLLM's `kv_cache_dtype=fp8` without calibration).

A block is quantized once, when it becomes full (engine/kv_cache/residual.py keeps the block
being filled in full precision, KIVI's residual), so a block's statistics are final when taken.

Shapes: a block batch is `(..., block_size, head_dim)`; the leading axes (heads, blocks) are
kept as they are.
"""

from __future__ import annotations

import math

import torch

SCALE_DTYPE = torch.float16
FP8_DTYPE = torch.float8_e4m3fn
FP8_SCALE = 1.0


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _affine(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and minimum mapping [lo, hi] onto 0..2^bits-1."""
    scale = ((hi - lo) / _levels(bits)).to(SCALE_DTYPE)
    return scale, lo.to(SCALE_DTYPE)


def _encode(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    # the stored (rounded) fp16 scale and minimum, so decoding inverts exactly this mapping
    safe = scale.float().clamp(min=torch.finfo(SCALE_DTYPE).tiny)
    q = torch.round((x - lo.float()) / safe)
    return q.clamp(0, _levels(bits)).to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., D) of 0..15 -> (..., D/2) bytes: channel 2i in the low nibble, 2i+1 in the high."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., D/2) bytes -> (..., D) of 0..15."""
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # (..., D/2, 2)
    return out.flatten(-2)


def quantize_keys(k: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """k (..., bs, D) -> (q (..., bs, D or D/2), scale (..., D), min (..., D)), per channel."""
    kf = k.float()
    scale, lo = _affine(kf.amin(dim=-2), kf.amax(dim=-2), bits)  # (..., D)
    q = _encode(kf, scale.unsqueeze(-2), lo.unsqueeze(-2), bits)  # (..., bs, D)
    return (pack_int4(q) if bits == 4 else q), scale, lo


def dequantize_keys(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_keys` -> (..., bs, D) in `dtype`."""
    ints = unpack_int4(q) if bits == 4 else q
    x = ints.float() * scale.unsqueeze(-2).float() + lo.unsqueeze(-2).float()
    return x.to(dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, ...]:
    """v (..., bs, D) -> (q, scale (..., bs, D/group), min (..., bs, D/group)), per token and
    group of `group` channels."""
    *lead, bs, d = v.shape
    g = v.float().view(*lead, bs, d // group, group)  # (..., bs, D/g, g)
    scale, lo = _affine(g.amin(dim=-1), g.amax(dim=-1), bits)  # (..., bs, D/g)
    q = _encode(g, scale.unsqueeze(-1), lo.unsqueeze(-1), bits).view(*lead, bs, d)
    return (pack_int4(q) if bits == 4 else q), scale, lo


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_values` -> (..., bs, D) in `dtype`."""
    ints = unpack_int4(q) if bits == 4 else q
    *lead, bs, d = ints.shape
    groups = scale.shape[-1]
    g = ints.float().view(*lead, bs, groups, d // groups)
    x = g * scale.unsqueeze(-1).float() + lo.unsqueeze(-1).float()
    return x.view(*lead, bs, d).to(dtype)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturating: values past e4m3's +-448 clamp instead of becoming NaN."""
    limit = torch.finfo(FP8_DTYPE).max
    return (x.float() / FP8_SCALE).clamp(-limit, limit).to(FP8_DTYPE)


def from_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * FP8_SCALE).to(dtype)


def hadamard(n: int, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix of size n (a power of two), H @ H.T = I.

    Rotating keys and queries by it leaves q.k unchanged while spreading each outlier channel
    over all channels, so per-channel ranges even out before quantization (QuaRot; llama.cpp
    rotates its quantized KV cache the same way)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head dim, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)
