"""Attention over quantized KV blocks (fp8, int8, int4), in PyTorch.

Writes go to the full-precision residual (engine/kv_cache/residual.py); a block whose last
token arrives is quantized from its residual slot into its page, before attention reads. Reads
gather only the blocks of the step's requests, dequantize them into the workspace (never the
whole cache), and put each request's open last block back from the residual, so the most
recent tokens are read as they were computed. With `spec.rotate`, keys and queries are turned
by a fixed Hadamard matrix first (scores are unchanged; outlier channels spread out).

The CPU kernel (cpu_kernel.py) serves decode for these formats where it builds, dequantizing
inside its block loop; this class is the reference it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention import cpu_kernel, paged
from engine.attention.backends import TorchPagedAttention
from engine.attention.metadata import AttentionMetadata
from engine.kv_cache import quantize
from engine.kv_cache.spec import QUANTIZED_BITS, KVCacheSpec
from engine.kv_cache.storage import LayerCache


class QuantizedPagedAttention(TorchPagedAttention):
    """One cache format (`spec.kv_dtype` in fp8 / int8 / int4) for one layer share."""

    name = "torch-quantized"

    def __init__(self, spec: KVCacheSpec, scale: float,
                 workspace: paged.Workspace | None = None, use_kernel: bool = False) -> None:
        super().__init__(scale, workspace)
        if spec.kv_dtype not in QUANTIZED_BITS:
            raise ValueError(f"{spec.kv_dtype} is not a quantized cache format")
        self.spec = spec
        self.bits = QUANTIZED_BITS[spec.kv_dtype]
        self.use_kernel = use_kernel
        self.rotation: torch.Tensor | None = None  # (D, D), made on first use on q's device
        if use_kernel:
            self.name = "cpu-kernel-quantized"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """q (T, H, D), k/v (T, Hk, D) -> (T, H, D): write, quantize what completed, attend."""
        if self.spec.rotate:
            q, k = self._rotate(q), self._rotate(k)
        res_k, res_v = cache.residual
        paged.write_kv(res_k, res_v, k, v, meta.residual_slot_mapping)
        if meta.complete_blocks.numel():
            self._quantize_completed(cache, meta.complete_blocks, meta.complete_slots)
        n_pre = meta.num_prefill_tokens
        out = torch.empty_like(q)  # (T, H, D)
        start = 0
        for i, (qlen, ctx, table) in enumerate(zip(meta.prefill_query_lens,
                                                   meta.prefill_context_lens,
                                                   meta.prefill_block_tables, strict=True)):
            end = start + qlen
            out[start:end] = self._prefill(q[start:end], k[start:end], v[start:end], cache,
                                           table, ctx, meta.prefill_tail_slots[i])
            start = end
        if meta.num_decode_tokens:
            out[n_pre:] = self.decode(q[n_pre:], cache, meta)
        return out

    # ---- writing ----------------------------------------------------------------------------
    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is None or self.rotation.device != x.device:
            self.rotation = quantize.hadamard(x.shape[-1], torch.float32, x.device)
        return (x.float() @ self.rotation).to(x.dtype)  # (..., D)

    def _quantize_completed(self, cache: LayerCache, blocks: torch.Tensor,
                            slots: torch.Tensor) -> None:
        """Quantize full blocks from their residual slots into their pages (dim 1: pages)."""
        res_k, res_v = cache.residual
        k = res_k.index_select(1, slots)  # (Hk, n, bs, D)
        v = res_v.index_select(1, slots)
        if self.spec.kv_dtype == "fp8":  # copied as bytes: CPU torch has no fp8 index_copy
            cache["k"].view(torch.uint8).index_copy_(1, blocks, quantize.to_fp8(k).view(
                torch.uint8))
            cache["v"].view(torch.uint8).index_copy_(1, blocks, quantize.to_fp8(v).view(
                torch.uint8))
            return
        group = v.shape[-1] // cache["v_scale"].shape[-1]
        for name, parts in (("k", quantize.quantize_keys(k, self.bits)),
                            ("v", quantize.quantize_values(v, self.bits, group))):
            for suffix, part in zip(("", "_scale", "_min"), parts, strict=True):
                cache[name + suffix].index_copy_(1, blocks, part)

    # ---- reading ----------------------------------------------------------------------------
    def score_keys(self, cache: LayerCache, tables: torch.Tensor, context_len: int,
                   tail_slot: int) -> torch.Tensor:
        last = torch.tensor([(context_len - 1) // self.spec.block_size], device=tables.device)
        keys, _ = self._context(cache, tables, torch.tensor([tail_slot], device=tables.device),
                                last, torch.float32)  # (1, Hk, n * bs, D)
        return keys[:, :, :context_len]

    def score_query(self, q: torch.Tensor) -> torch.Tensor:
        return self._rotate(q) if self.spec.rotate else q

    def read_blocks(self, cache: LayerCache, block_ids: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K and V of `block_ids` (n,): each (Hk, n, bs, D) in `dtype`."""
        if self.spec.kv_dtype == "fp8":  # gathered as bytes (no fp8 index_select on CPU)
            k, v = (cache[name].view(torch.uint8).index_select(1, block_ids).view(
                quantize.FP8_DTYPE) for name in ("k", "v"))
            return quantize.from_fp8(k, dtype), quantize.from_fp8(v, dtype)
        pick = {name: t.index_select(1, block_ids) for name, t in cache.tensors.items()}
        k = quantize.dequantize_keys(pick["k"], pick["k_scale"], pick["k_min"], self.bits, dtype)
        v = quantize.dequantize_values(pick["v"], pick["v_scale"], pick["v_min"], self.bits,
                                       dtype)
        return k, v

    def _prefill(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 cache: LayerCache, table: torch.Tensor, context_len: int,
                 tail_slot: int) -> torch.Tensor:
        """One request's chunk over its whole context; the chunk's own tokens are used as
        computed (full precision), earlier ones as cached."""
        tq = q.shape[0]
        if context_len == tq:  # no cached prefix: the chunk is the whole context
            k, v = k_new.transpose(0, 1), v_new.transpose(0, 1)  # (Hk, Tq, D)
            mask, causal = None, True
        else:
            last = torch.tensor([(context_len - 1) // self.spec.block_size], device=q.device)
            k, v = self._context(cache, table[None], torch.tensor([tail_slot], device=q.device),
                                 last, q.dtype)
            k, v = k[0, :, :context_len].clone(), v[0, :, :context_len].clone()  # (Hk, L, D)
            k[:, context_len - tq:] = k_new.transpose(0, 1)
            v[:, context_len - tq:] = v_new.transpose(0, 1)
            rows = torch.arange(context_len - tq, context_len, device=q.device)  # (Tq,)
            mask = torch.arange(context_len, device=q.device) <= rows[:, None]  # (Tq, L)
            present = (table != cache.null_block).repeat_interleave(self.spec.block_size)
            mask &= present[:context_len]
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)  # (Tq, H, D)

    def _context(self, cache: LayerCache, tables: torch.Tensor, tail_slots: torch.Tensor,
                 last_blocks: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole block tables (B, n) -> each (B, Hk, n * bs, D): quantized blocks
        dequantized, and each row's open last block (index `last_blocks[row]`, the block of its
        last token) taken from the residual slot `tail_slots[row]` (-1: none open)."""
        b, n = tables.shape
        k, v = self.read_blocks(cache, tables.reshape(-1), dtype)  # (Hk, B*n, bs, D)
        open_rows = (tail_slots >= 0).nonzero().flatten()
        if open_rows.numel():
            at = open_rows * n + last_blocks[open_rows]
            res_k, res_v = cache.residual
            k[:, at] = res_k[:, tail_slots[open_rows]].to(dtype)
            v[:, at] = res_v[:, tail_slots[open_rows]].to(dtype)
        hk, _, bs, d = k.shape
        return (k.view(hk, b, n * bs, d).transpose(0, 1),
                v.view(hk, b, n * bs, d).transpose(0, 1))

    def decode(self, q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata
               ) -> torch.Tensor:
        """One new token per request: q (Bd, H, D) -> (Bd, H, D)."""
        if self.use_kernel:
            out = cpu_kernel.paged_decode_quantized(q, cache, meta.decode_block_tables,
                                                    meta.decode_context_lens,
                                                    meta.decode_tail_slots, self.scale)
            if out is not None:
                return out
        tables = meta.decode_block_tables
        if meta.decode_attn_bias is None:  # the group's first layer builds it for the others
            meta.decode_attn_bias = paged.decode_attn_bias(
                meta.decode_context_lens, tables, self.spec.block_size, cache.null_block,
                q.dtype)
        last = (meta.decode_context_lens - 1) // self.spec.block_size  # (B,)
        k, v = self._context(cache, tables, meta.decode_tail_slots, last, q.dtype)  # (B,Hk,L,D)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=meta.decode_attn_bias,
            scale=self.scale, enable_gqa=True)  # (B, H, 1, D)
        return out.squeeze(2)
