"""MLA's two ways to attend over cached latents, in PyTorch (the functions behind mla.py).

A cached entry is `[c_kv ; k_pe]`: c_kv (R values) and the RoPE keys of Hr RoPE heads (Dr
each). Query head h has a nope part q_nope (Dn) and a RoPE part q_pe (Dr) that meets RoPE head
h // (H / Hr). With W_UK (H, Dn, R) and W_UV (H, R, Dv) the up-projections of kv_b_proj:

    score(h, t) = q_nope[h] . (W_UK[h] c_t) + q_pe[h] . k_pe[g(h), t]
    out[h]      = W_UV[h]^T sum_t p(h, t) c_t

- expanded: up-project every context latent to K_nope and V of all H heads, then ordinary
  multi-head attention. Costs L * R * H * (Dn + Dv) multiply-adds for the context, per layer.
- absorbed: fold W_UK into the query (q_lat = W_UK[h]^T q_nope[h], R values) and W_UV into the
  output, then attend over the latents as multi-query attention: one key of R + Hr * Dr values
  per token (the entry itself; q's RoPE part sits in its head's slot, zeros elsewhere) and a
  value of R values, a view of the same entry. Costs L * H * (2R + Hr*Dr) per query token.

Shapes: T tokens, B requests, L context, H heads, W = R + Hr * Dr the entry width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class LatentProjections:
    """One layer's up-projections from the latent, shared by both paths."""

    kv_b: torch.Tensor  # (H * (Dn + Dv), R): c_kv -> [k_nope ; v] of every head
    w_uk: torch.Tensor  # (H, Dn, R), contiguous: absorbed into queries
    w_uv: torch.Tensor  # (H, R, Dv), contiguous: absorbed into outputs
    num_rope_heads: int

    @classmethod
    def from_kv_b(cls, kv_b: torch.Tensor, num_heads: int, nope_dim: int, v_dim: int,
                  num_rope_heads: int) -> LatentProjections:
        w = kv_b.view(num_heads, nope_dim + v_dim, -1)  # (H, Dn + Dv, R)
        return cls(kv_b, w[:, :nope_dim].contiguous(),
                   w[:, nope_dim:].transpose(1, 2).contiguous(), num_rope_heads)

    @property
    def num_heads(self) -> int:
        return self.w_uk.shape[0]

    @property
    def nope_dim(self) -> int:
        return self.w_uk.shape[1]

    @property
    def rank(self) -> int:
        return self.w_uk.shape[2]

    @property
    def v_dim(self) -> int:
        return self.w_uv.shape[2]


def absorb_query(q: torch.Tensor, up: LatentProjections, scale: float) -> torch.Tensor:
    """q (T, H, Dn + Dr) -> the MQA query over entries (T, H, W), pre-scaled."""
    t, h, _ = q.shape
    dn, r, hr = up.nope_dim, up.rank, up.num_rope_heads
    dr = q.shape[-1] - dn
    out = q.new_zeros(t, h, r + hr * dr)  # (T, H, W): other RoPE heads' slots stay 0
    q_nope = q[..., :dn].transpose(0, 1).contiguous()  # (H, T, Dn): strided bmm is ~5x slower
    out[..., :r] = torch.bmm(q_nope, up.w_uk).transpose(0, 1)  # (T, H, R)
    group = h // hr
    for g in range(hr):
        heads = slice(g * group, (g + 1) * group)
        out[:, heads, r + g * dr: r + (g + 1) * dr] = q[:, heads, dn:]
    return out.mul_(scale)


def absorb_output(out_lat: torch.Tensor, up: LatentProjections) -> torch.Tensor:
    """Attention over latents (H, T, R) -> per-head outputs (T, H, Dv)."""
    return torch.bmm(out_lat, up.w_uv).transpose(0, 1)  # (T, H, Dv)


def expand(ctx: torch.Tensor, up: LatentProjections, dr: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries (L, W) -> K (H, L, Dn + Dr) and V (H, L, Dv) of every head."""
    length, r, h = ctx.shape[0], up.rank, up.num_heads
    dn, hr = up.nope_dim, up.num_rope_heads
    kv = F.linear(ctx[:, :r], up.kv_b).view(length, h, dn + up.v_dim)  # (L, H, Dn + Dv)
    k_pe = ctx[:, r:].view(length, hr, 1, dr).expand(length, hr, h // hr, dr)  # (L, Hr, G, Dr)
    k = torch.cat((kv[..., :dn], k_pe.reshape(length, h, dr)), dim=-1)  # (L, H, Dn + Dr)
    return k.transpose(0, 1), kv[..., dn:].transpose(0, 1)  # (H, L, .)


def prefill_expanded(q: torch.Tensor, ctx: torch.Tensor, up: LatentProjections,
                     mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One request's chunk q (Tq, H, Dn + Dr) over entries (L, W) -> (Tq, H, Dv). `mask`
    (Tq, L) bool, or None for a causal chunk that is its whole context."""
    k, v = expand(ctx, up, q.shape[-1] - up.nope_dim)  # (H, L, .)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),  # (1, H, T|L, .)
        attn_mask=mask, is_causal=mask is None, scale=scale)  # (1, H, Tq, Dv)
    return out[0].transpose(0, 1)


def prefill_absorbed(q: torch.Tensor, ctx: torch.Tensor, up: LatentProjections,
                     mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The same through the latent: the H heads fold into the query axis of one MQA call,
    so the (L, W) entries are read once for all heads, never copied per head."""
    tq, h, _ = q.shape
    length = ctx.shape[0]
    q_abs = absorb_query(q, up, 1.0).transpose(0, 1).reshape(1, 1, h * tq, -1)  # (1,1,H*Tq,W)
    if mask is None:  # causal over the chunk itself
        mask = torch.ones(tq, length, dtype=torch.bool, device=q.device).tril(length - tq)
    folded = mask.expand(h, tq, length).reshape(h * tq, length)  # row h*Tq + i: query i
    out = F.scaled_dot_product_attention(
        q_abs, ctx[None, None], ctx[None, None, :, :up.rank], attn_mask=folded,
        scale=scale)  # (1, 1, H*Tq, R)
    return absorb_output(out.view(h, tq, up.rank), up)


def decode_absorbed(q_abs: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor, rank: int
                    ) -> torch.Tensor:
    """Batched decode over the latent: q_abs (m, H, W) pre-scaled, entries (m, L, W), bias
    (m, 1, L) -> (m, H, R). Scores and softmax in fp32."""
    scores = torch.bmm(q_abs.float(), ctx.transpose(1, 2).float())  # (m, H, L)
    scores.add_(bias)
    probs = torch.softmax(scores, dim=-1).to(ctx.dtype)
    return torch.bmm(probs, ctx[..., :rank])  # (m, H, R): the value is a view of the entry


def decode_expanded(q: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor,
                    up: LatentProjections, scale: float) -> torch.Tensor:
    """Decode by expansion: q (m, H, Dn + Dr), entries (m, L, W), bias (m, 1, L) ->
    (m, H, Dv). One request at a time: the expanded K/V of one is H * L * (2Dn + Dv) values."""
    out = q.new_empty(q.shape[0], up.num_heads, up.v_dim)
    dr = q.shape[-1] - up.nope_dim
    for i in range(q.shape[0]):
        k, v = expand(ctx[i], up, dr)  # (H, L, .)
        o = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, attn_mask=bias[i, None],
                                           scale=scale)  # (H, 1, Dv)
        out[i] = o.squeeze(1)
    return out
