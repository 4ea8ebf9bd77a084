"""Attention backends: how one layer's share of the cache is written and attended over.

A backend reads its layer's storage through the spec's tensor names (`cache["k"]`), so a new
cache format (quantized blocks, a latent cache) is a new backend class, chosen once per layer
by `select_backend`, not a branch inside the attention code.

- `TorchPagedAttention`: K/V caches in any float dtype on any device; prefill with SDPA over
  the gathered context, decode with grouped batched matmuls (paged.py).
- `CpuKernelAttention`: the same, but decode runs the fused C kernel (cpu_kernel.py), which
  reads blocks in place; CPU, fp32 queries over fp32, bf16 or fp16 caches.
- `QuantizedPagedAttention` (quantized.py): fp8 / int8 / int4 blocks and their residual.
- `MLAAttention` (mla.py) and `QuantizedMLAAttention` (mla_quantized.py): latent caches
  (`spec.attention == "latent"`), absorbed or expanded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.attention import cpu_kernel, paged
from engine.attention.metadata import AttentionMetadata
from engine.kv_cache.spec import KVCacheSpec
from engine.kv_cache.storage import LayerCache

if TYPE_CHECKING:
    from engine.attention.mla import MLAAttention


class TorchPagedAttention:
    """The PyTorch path, and the reference every other backend is tested against."""

    name = "torch"

    def __init__(self, scale: float, workspace: paged.Workspace | None = None) -> None:
        self.scale = scale
        self.workspace = workspace

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """All T tokens of a step: q (T, H, D), k/v (T, Hk, D) -> (T, H, D); writes k/v first.
        Prefill tokens come first in the step (see AttentionMetadata)."""
        k_cache, v_cache = cache["k"], cache["v"]
        paged.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        n_pre = meta.num_prefill_tokens
        if n_pre == 0:
            return self.decode(q, cache, meta)
        out = torch.empty_like(q)  # (T, H, D)
        start = 0
        for qlen, ctx, table in zip(meta.prefill_query_lens, meta.prefill_context_lens,
                                    meta.prefill_block_tables, strict=True):
            end = start + qlen
            out[start:end] = paged.prefill_attention(
                q[start:end], k[start:end], v[start:end], k_cache, v_cache, table, ctx,
                self.scale, cache.null_block, self.workspace)
            start = end
        if meta.num_decode_tokens:
            out[n_pre:] = self.decode(q[n_pre:], cache, meta)
        return out

    def score_keys(self, cache: LayerCache, tables: torch.Tensor, context_len: int,
                   tail_slot: int) -> torch.Tensor:
        """Keys of one block table (1, n) as attention scores see them -> (1, Hk, L, D)."""
        keys = paged.gather_blocks(cache["k"], tables[0])  # (Hk, n * bs, D)
        return keys[None, :, :context_len]

    def score_query(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def decode(self, q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata
               ) -> torch.Tensor:
        """One new token per decoding request: q (Bd, H, D) -> (Bd, H, D)."""
        if meta.decode_attn_bias is None:  # the group's first layer builds it for the others
            meta.decode_attn_bias = paged.decode_attn_bias(
                meta.decode_context_lens, meta.decode_block_tables, cache.spec.block_size,
                cache.null_block, q.dtype)
        return paged.decode_attention(q, cache["k"], cache["v"], meta.decode_block_tables,
                                      meta.decode_attn_bias, self.scale, self.workspace)


class CpuKernelAttention(TorchPagedAttention):
    """Decode through the fused C kernel; anything it cannot serve takes the PyTorch path."""

    name = "cpu-kernel"

    def decode(self, q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata
               ) -> torch.Tensor:
        kernel = (cpu_kernel.paged_decode if cache["k"].dtype == torch.float32
                  else cpu_kernel.paged_decode_half)
        out = kernel(q, cache["k"], cache["v"], meta.decode_block_tables,
                     meta.decode_context_lens, self.scale, cache.null_block)
        return out if out is not None else super().decode(q, cache, meta)


def select_backend(spec: KVCacheSpec, device: torch.device, scale: float,
                   workspace: paged.Workspace | None, mla_path: str = "auto"
                   ) -> TorchPagedAttention | MLAAttention:
    """The fused kernel for fp32 and quantized caches on a CPU where it builds, the PyTorch
    path elsewhere; latent caches get the MLA backend (`mla_path`: see mla.py)."""
    if spec.attention == "latent":
        from engine.attention.mla import mla_backend

        return mla_backend(spec, scale, workspace, mla_path)
    if spec.attention != "full":
        raise ValueError(f"no attention backend for {spec.attention!r} caches yet")
    kernel = device.type == "cpu" and cpu_kernel.available()
    if spec.quantized:
        from engine.attention.quantized import QuantizedPagedAttention

        return QuantizedPagedAttention(spec, scale, workspace, use_kernel=kernel)
    if kernel:  # fp32, bf16 and fp16 caches (16-bit ones and 16-bit queries widened in C)
        return CpuKernelAttention(scale, workspace)
    return TorchPagedAttention(scale, workspace)
