"""Paged decode attention through the CPU kernel (engine/cpu/paged_decode.c).

Why a kernel: the PyTorch decode path copies every request's blocks into a workspace before
its matmuls, and that copy alone costs ~0.6x of contiguous SDPA (bench/paged_attention.py);
the kernel reads each block where it lies and streams the softmax, so K/V are read once.

The kernel lives in the lab's CPU library (engine/cpu/library.py: built with gcc on first use,
cached per source, compiler and CPU). Each function here returns None whenever the kernel
cannot serve a call (not a CPU tensor of a dtype it reads, no gcc, failed build,
`KVLAB_DISABLE_CPU_KERNEL=1`) and the caller falls back to the PyTorch path; it never raises
for those reasons.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from engine.cpu import library

if TYPE_CHECKING:
    from engine.kv_cache.storage import LayerCache

_c_int, _c_float, _ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_ARGTYPES = [_ptr] * 6 + [_c_int] * 7 + [_c_float, _c_int, ctypes.c_int64]
_QUANT_ARGTYPES = ([_c_int] + [_ptr] * 7 + [_c_int] + [_ptr] * 2 + [_c_int] + [_ptr] * 4
                   + [_c_int] * 7 + [_c_float, _c_int, ctypes.c_int64])
QUANT_FORMATS = {"fp8": 1, "int8": 2, "int4": 3}
HALF_FORMATS = {torch.bfloat16: 4, torch.float16: 5}
# queries in these dtypes are widened to fp32 for the kernel (a (B, H, D) copy) and its output
# narrowed back: under bf16 weights the cache and the softmax still run in fp32 arithmetic
QUERY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_F32 = library.Entry("paged_decode_f32", _ARGTYPES)  # fp32 caches
_QUANT = library.Entry("paged_decode_quant", _QUANT_ARGTYPES)  # quantized and 16-bit caches


def available() -> bool:
    """Whether the kernel is built and loaded (building it now if needed)."""
    return _F32.get() is not None


def paged_decode_half(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                      null_block: int = -1) -> torch.Tensor | None:
    """`paged_decode` for bf16 / fp16 caches under an fp32 query (rows widened to fp32 inside
    the block loop); None where the kernel does not apply."""
    if (not q.is_cpu or q.dtype not in QUERY_DTYPES or k_cache.dtype not in HALF_FORMATS
            or v_cache.dtype != k_cache.dtype):
        return None
    quant_fn = _QUANT.get()
    if quant_fn is None:
        return None
    out_dtype, q = q.dtype, q.float().contiguous()
    b, h, d = q.shape
    hk, num_blocks, bs, dk = k_cache.shape
    if dk != d or h % hk or d > 512 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_decode_half: unexpected cache layout or shapes")
    block_tables, context_lens = block_tables.long().contiguous(), context_lens.long()
    out = torch.empty_like(q)
    status = quant_fn(
        HALF_FORMATS[k_cache.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        None, None, None, None, 1, None, None, 0, None, block_tables.data_ptr(),
        context_lens.data_ptr(), out.data_ptr(), b, h, hk, d, num_blocks, bs,
        block_tables.shape[1], scale, torch.get_num_threads(), null_block)
    if status != 0:
        raise IndexError(f"decode block table holds a block id outside the cache (status "
                         f"{status})")
    return out.to(out_dtype)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                 null_block: int = -1) -> torch.Tensor | None:
    """Decode attention through block tables: q (B, H, D), caches (Hk, num_blocks, bs, D),
    block_tables (B, n), context_lens (B,) -> (B, H, D), or None where the kernel does not
    apply (the caller then runs the PyTorch path). Table entries equal to `null_block` are
    skipped (blocks given back mid-request)."""
    # this runs for every layer of every decode step: keep it to cheap attribute checks
    if (not q.is_cpu or q.dtype not in QUERY_DTYPES or k_cache.dtype != torch.float32
            or v_cache.dtype != torch.float32):
        return None
    fn = _F32.get()
    if fn is None:
        return None
    b, h, d = q.shape
    hk, num_blocks, bs, dk = k_cache.shape
    # a mismatch here would read out of bounds in C rather than fail: check the cheap things
    if (dk != d or h % hk or v_cache.shape != k_cache.shape or block_tables.dim() != 2
            or block_tables.shape[0] != b or context_lens.shape != (b,)):
        raise ValueError(f"paged_decode shapes: q {tuple(q.shape)}, cache "
                         f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)}, tables "
                         f"{tuple(block_tables.shape)}, context_lens {tuple(context_lens.shape)}")
    # the kernel indexes raw memory: layouts must be exactly what it assumes (all no-ops, and
    # cheap, in the engine, whose tensors already are)
    out_dtype = q.dtype
    q, k_cache, v_cache = q.float().contiguous(), k_cache.contiguous(), v_cache.contiguous()
    if block_tables.dtype != torch.int64:
        block_tables = block_tables.long()
    if context_lens.dtype != torch.int64:
        context_lens = context_lens.long()
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    out = torch.empty_like(q)  # (B, H, D)
    status = fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                context_lens.data_ptr(), out.data_ptr(), b, h, hk, d, num_blocks, bs,
                block_tables.shape[1], scale, torch.get_num_threads(), null_block)
    if status != 0:
        raise IndexError("decode block table holds a block id outside the cache "
                         f"(0..{num_blocks - 1}), or kernel scratch allocation failed")
    return out.to(out_dtype)


def paged_decode_quantized(q: torch.Tensor, cache: LayerCache, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, tail_slots: torch.Tensor, scale: float
                           ) -> torch.Tensor | None:
    """Decode over quantized blocks (fp8, int8, int4: `cache.spec.kv_dtype`), each dequantized
    inside the kernel's block loop, with each request's open last block read from the fp32
    residual (`tail_slots`, -1: none); None where the kernel does not apply."""
    spec = cache.spec
    if (not q.is_cpu or q.dtype not in QUERY_DTYPES or cache.residual is None
            or cache.residual[0].dtype != torch.float32 or spec.kv_dtype not in QUANT_FORMATS):
        return None
    quant_fn = _QUANT.get()
    if quant_fn is None:
        return None
    out_dtype = q.dtype
    q = q.float().contiguous()  # a slice of the fused q/k/v projection
    b, h, d = q.shape
    res_k, res_v = cache.residual  # (Hk, slots, bs, D)
    hk, slots, bs, _ = res_k.shape
    k_q, v_q = cache["k"], cache["v"]
    num_blocks = k_q.shape[1]
    if spec.kv_dtype == "fp8":
        k_q, v_q = k_q.view(torch.uint8), v_q.view(torch.uint8)
        parts = [None] * 4
        groups = 1
    else:
        parts = [cache[n].view(torch.int16) for n in ("k_scale", "k_min", "v_scale", "v_min")]
        groups = cache["v_scale"].shape[-1]
    block_tables, context_lens = block_tables.long().contiguous(), context_lens.long()
    tail_slots = tail_slots.long().contiguous()
    # the kernel indexes raw memory: the cache's layout must be exactly what it assumes
    tensors = [k_q, v_q, *[p for p in parts if p is not None], res_k, res_v]
    if any(not t.is_contiguous() for t in tensors) or d != spec.head_dim or h % hk:
        raise ValueError("paged_decode_quantized: unexpected cache layout or shapes")
    out = torch.empty_like(q)  # (B, H, D)
    ptr = [None if p is None else p.data_ptr() for p in parts]
    status = quant_fn(
        QUANT_FORMATS[spec.kv_dtype], q.data_ptr(), k_q.data_ptr(), v_q.data_ptr(), *ptr,
        groups, res_k.data_ptr(), res_v.data_ptr(), slots, tail_slots.data_ptr(),
        block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(), b, h, hk, d,
        num_blocks, bs, block_tables.shape[1], scale, torch.get_num_threads(), cache.null_block)
    if status != 0:
        raise IndexError("decode block table holds a block id outside the cache, or kernel "
                         f"scratch allocation failed (status {status})")
    return out.to(out_dtype)
