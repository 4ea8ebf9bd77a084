"""Paged attention in PyTorch: write new K/V through a slot mapping, read through block tables.

The functions behind `backends.TorchPagedAttention`: CUDA, bf16/fp16, and the reference the
fused CPU kernel (cpu_kernel.py, 0.7-0.85x contiguous SDPA at B=8, ctx 2048, against 1.4-1.7x
for the gather path here; `python bench/paged_attention.py` prints both) is tested against.
Block tables may hold the null block (a block given back mid-request): its positions are
masked, so its (zero) contents never count.

Caches are head-major, `[kv_heads, num_blocks, block_size, head_dim]` per layer (see
engine/kv_cache.py for why). The read path is `gather_blocks`: one `index_select` over a flat
list of block ids yields `(kv_heads, n_blocks * block_size, head_dim)` contiguous, so a batch
of decode requests becomes `(kv_heads, B, L, D)` with no permute copy.

Decode attends with the query grouped as (kv_heads, B, group, D) and plain batched matmuls
(DESIGN.md measured 1.3-1.9 ms for these vs ~3.0 ms for SDPA(enable_gqa=True) at B=8, ctx 2048);
scores and softmax run in fp32. On CPU the batch is processed in chunks of a few MiB of K/V so
the gathered copy is still in cache when the matmuls read it. Prefill attends per request with
SDPA and a causal mask shifted by the cached prefix.

Scratch memory: the gathered K/V of a decode step is tens of MB. A fresh allocation of that size
is a fresh mmap on CPU, and page-faulting it in cost more than the attention itself on the
2-core VM (6.4x SDPA without reuse vs 1.4x with glibc told to keep freed memory; 1 thread). So
gathers and scores land in a `Workspace` of buffers reused across layers and steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Workspace:
    """Scratch buffers reused by every layer of every step. One per KV cache; a cache serves one
    step at a time, and each buffer is consumed within the layer that fills it."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            # headroom: decode contexts grow a block at a time; do not reallocate each time
            buf = torch.empty(numel + numel // 2, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v (T, Hk, D) at flat slots (T,) of caches (Hk, num_blocks, block_size, D)."""
    hk, nb, bs, d = k_cache.shape
    # a cache may be stored narrower than the activations (kv_dtype bf16 under fp32 weights)
    k_cache.view(hk, nb * bs, d).index_copy_(1, slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.view(hk, nb * bs, d).index_copy_(1, slot_mapping, v.transpose(0, 1).to(v_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """(Hk, num_blocks, bs, D) gathered at (n,) block ids -> contiguous (Hk, n * bs, D).
    `out`, if given, is an (Hk, n, bs, D) buffer to fill instead of allocating.

    Gathers rows of the 2-D view (Hk * num_blocks, bs * D) with per-head row ids: index_select
    on dim 0 of a 2-D tensor is a parallel memcpy per row, 1.2 ms vs 2.0 ms for index_select on
    dim 1 of the 4-D cache (B=8, ctx 2048, block 16; 1.2 ms is also a plain copy's time)."""
    hk, nb, bs, d = cache.shape
    rows = (torch.arange(hk, device=block_ids.device)[:, None] * nb + block_ids).reshape(-1)
    flat_out = None if out is None else out.view(hk * block_ids.shape[0], bs * d)
    gathered = torch.index_select(cache.view(hk * nb, bs * d), 0, rows, out=flat_out)
    return gathered.view(hk, block_ids.shape[0] * bs, d)


def _scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], like: torch.Tensor,
             dtype: torch.dtype | None = None) -> torch.Tensor | None:
    return None if ws is None else ws.take(name, shape, dtype or like.dtype, like.device)


def decode_attn_bias(context_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                     null_block: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, L) additive mask, L = n_blocks * block_size: 0 where a key position is below
    the row's context length and its block is not the null block, else -inf."""
    b, n = block_tables.shape
    pos = torch.arange(n * block_size, device=context_lens.device)  # (L,)
    masked = pos >= context_lens[:, None]  # (B, L)
    masked |= (block_tables == null_block).repeat_interleave(block_size, dim=1)  # (B, L)
    bias = torch.zeros(b, n * block_size, dtype=dtype, device=context_lens.device)
    bias.masked_fill_(masked, float("-inf"))  # (B, L)
    return bias[:, None, None, :]  # (B, 1, 1, L): broadcasts over (Hk, B, G, L) as (B, G, L)


DECODE_CHUNK_BYTES = 3 << 20  # gathered K per CPU decode chunk; see decode_chunk_rows


def decode_chunk_rows(num_kv_heads: int, length: int, head_dim: int, element_size: int,
                      device: torch.device) -> int | None:
    """Requests per decode chunk: on CPU, enough for ~3 MiB of gathered K, so a chunk's K and V
    are still in the (32 MiB, shared) L3 when the matmuls read them. B=8, ctx 2048, 2 threads,
    vs SDPA, block 16/64: 1.5 MiB 2.1/1.9x, 3 MiB 1.5/1.3x, 6 MiB 1.6/1.45x, unchunked
    1.8/1.7x (1.5 MiB = one request: 3 bmm batches split unevenly over 2 threads). On GPUs
    chunking only adds launches: None means all requests in one chunk."""
    if device.type != "cpu":
        return None
    return max(1, DECODE_CHUNK_BYTES // (num_kv_heads * length * head_dim * element_size))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, attn_bias: torch.Tensor, scale: float,
                     workspace: Workspace | None = None) -> torch.Tensor:
    """One new token per request. q (B, H, D), block_tables (B, n), attn_bias (B, 1, 1, L)
    -> (B, H, D). Requests are processed in chunks (see `decode_chunk_rows`)."""
    b, h, d = q.shape
    hk, _, bs, _ = k_cache.shape
    length = block_tables.shape[1] * bs
    rows = decode_chunk_rows(hk, length, d, k_cache.element_size(), q.device) or b
    # query head j*G + g reads kv head j (the layout transformers' repeat_kv assumes)
    qg = (q * scale).view(b, hk, h // hk, d).transpose(0, 1)  # (Hk, B, G, D)
    if rows >= b:
        out = _decode_chunk(qg, k_cache, v_cache, block_tables, attn_bias, workspace)
        return out.permute(1, 0, 2, 3).reshape(b, h, d)
    out = torch.empty_like(q)  # (B, H, D)
    for s in range(0, b, rows):
        e = min(b, s + rows)
        o = _decode_chunk(qg[:, s:e], k_cache, v_cache, block_tables[s:e], attn_bias[s:e],
                          workspace)  # (Hk, m, G, D)
        out[s:e] = o.permute(1, 0, 2, 3).reshape(e - s, h, d)
    return out


def _decode_chunk(qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, attn_bias: torch.Tensor,
                  workspace: Workspace | None) -> torch.Tensor:
    """qg (Hk, m, G, D), pre-scaled; block_tables (m, n) -> (Hk, m, G, D)."""
    hk, m, group, d = qg.shape
    n, bs = block_tables.shape[1], k_cache.shape[2]
    length = n * bs
    flat_ids = block_tables.reshape(-1)
    shape = (hk, m * n, bs, d)
    k = gather_blocks(k_cache, flat_ids, _scratch(workspace, "k", shape, k_cache))
    k = k.view(hk * m, length, d).to(qg.dtype)  # (Hk*m, L, D), contiguous: no permute copy
    q3 = qg.reshape(hk * m, group, d)  # (Hk*m, G, D), a small copy
    scores = _scratch(workspace, "scores", (hk * m, group, length), qg, torch.float32)
    if qg.dtype == torch.float32:
        scores = torch.bmm(q3, k.transpose(1, 2), out=scores)  # (Hk*m, G, L)
    else:  # low precision: scores and softmax in fp32 (exp amplifies rounding of the logits)
        scores = torch.bmm(q3.float(), k.transpose(1, 2).float(), out=scores)
    # (m, 1, L) bias broadcast over (Hk, m, G, L): masks padding and unwritten slots
    scores.view(hk, m, group, length).add_(attn_bias.squeeze(1))
    probs = _scratch(workspace, "probs", scores.shape, qg, torch.float32)
    probs = torch.softmax(scores, dim=-1, out=probs).to(qg.dtype)  # (Hk*m, G, L)
    v = gather_blocks(v_cache, flat_ids, _scratch(workspace, "v", shape, v_cache))
    out = torch.bmm(probs, v.view(hk * m, length, d).to(qg.dtype))  # (Hk*m, G, D)
    return out.view(hk, m, group, d)


def prefill_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      context_len: int, scale: float, null_block: int,
                      workspace: Workspace | None = None) -> torch.Tensor:
    """One request's chunk q (Tq, H, D) over its whole context -> (Tq, H, D).

    Without a cached prefix the chunk's own k/v (Tq, Hk, D) are the whole context, so the cache
    is not read back. Otherwise query i sits at position context_len - Tq + i and sees keys up
    to it (a causal mask aligned bottom-right), except those of null blocks."""
    tq = q.shape[0]
    if context_len == tq:
        k, v = k_new.transpose(0, 1), v_new.transpose(0, 1)  # (Hk, Tq, D)
        mask, causal = None, True
    else:
        shape = (k_cache.shape[0], block_table.shape[0], *k_cache.shape[2:])
        k = gather_blocks(k_cache, block_table, _scratch(workspace, "k", shape, k_cache))
        v = gather_blocks(v_cache, block_table, _scratch(workspace, "v", shape, v_cache))
        k, v = k[:, :context_len].to(q.dtype), v[:, :context_len].to(q.dtype)  # (Hk, L, D)
        rows = torch.arange(context_len - tq, context_len, device=q.device)  # (Tq,)
        mask = torch.arange(context_len, device=q.device) <= rows[:, None]  # (Tq, L)
        present = (block_table != null_block).repeat_interleave(k_cache.shape[2])  # (n*bs,)
        mask &= present[:context_len]
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),  # (1, H|Hk, T|L, D)
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)  # (1, H, Tq, D)
    return out[0].transpose(0, 1)  # (Tq, H, D)
