"""A Llama decoder layer's work in C, for the few bf16 rows of a CPU decode step
(engine/cpu/llama_layer_bf16.c): `decode_layers` runs every layer of a decode-only step in one
call, attention included; elsewhere `attention_in` (norm, q/k/v projection, RoPE) and
`mlp_out` (output projection, residual, norm, SwiGLU MLP, residual) are a layer's work around
attention in two calls.

`applies` says whether a step's rows may take these paths (CPU bf16 tensors autograd does not
follow, at most linear.MAX_ROWS rows, a library built with AVX512-BF16), `weights_apply`
whether a layer's weights may (`decode_layers` checks its own); otherwise the model
runs its op-by-op path, whose results these calls reproduce bit for bit.
"""

from __future__ import annotations

import ctypes

import torch

from engine.cpu import library, linear, tracks_grad

_ptr, _c_int, _c_float = ctypes.c_void_p, ctypes.c_int, ctypes.c_float

_ATTENTION_IN = library.Entry("llama_attention_in_bf16",
                              [_ptr, _ptr, _c_float] + [_ptr] * 4 + [_c_int] * 6)
_MLP_OUT = library.Entry("llama_mlp_out_bf16",
                         [_ptr] * 4 + [_c_float] + [_ptr] * 3 + [_c_int] * 5)
MAX_WIDTH = 8192  # the norm kernel's row buffer (rms_norm_bf16.c)


def applies(x: torch.Tensor) -> bool:
    """Whether the fused calls serve activations x (T, C): CPU bf16 at decode sizes, with the
    library loaded. Called for every step (and layer) on every device: cheap checks only, and
    the caller asks this before it fetches any weight."""
    return (x.dtype == torch.bfloat16 and x.is_cpu and x.dim() == 2
            and 0 < x.shape[0] <= linear.MAX_ROWS and x.shape[1] <= MAX_WIDTH
            and not tracks_grad(x) and linear.available() and _MLP_OUT.get() is not None)


def weights_apply(*weights: torch.Tensor) -> bool:
    """Whether the two-call layer path serves these weights (once `applies(x)`)."""
    return all(w.dtype == torch.bfloat16 and w.is_cpu and w.is_contiguous()
               for w in weights) and not tracks_grad(*weights)


def _check(status: int, name: str) -> None:
    if status != 0:
        raise MemoryError(f"{name}: the kernel could not allocate its scratch (status {status})")


def attention_in(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_qkv: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, rotated_heads: int, head_dim: int
                 ) -> torch.Tensor:
    """x (T, C) -> qkv (T, heads, D) = rope(rms_norm(x) @ w_qkv.T), heads = w_qkv rows / D,
    the first `rotated_heads` (q and k) rotated by cos, sin (T, 1, D). Only where `applies`."""
    rows, width = x.shape
    heads = w_qkv.shape[0] // head_dim
    if (w_qkv.shape != (heads * head_dim, width) or norm_weight.shape != (width,)
            or not 0 <= rotated_heads <= heads):
        raise ValueError(f"attention_in: x {tuple(x.shape)}, w_qkv {tuple(w_qkv.shape)}, norm "
                         f"{tuple(norm_weight.shape)}, {rotated_heads} rotated heads of {head_dim}")
    x = x.contiguous()
    cos = cos.reshape(rows, head_dim).to(torch.bfloat16).contiguous()
    sin = sin.reshape(rows, head_dim).to(torch.bfloat16).contiguous()
    qkv = torch.empty(rows, heads, head_dim, dtype=torch.bfloat16)
    _check(_ATTENTION_IN.get()(x.data_ptr(), norm_weight.data_ptr(), eps, w_qkv.data_ptr(),
                               cos.data_ptr(), sin.data_ptr(), qkv.data_ptr(), rows, width,
                               rotated_heads, heads, head_dim, torch.get_num_threads()),
           "attention_in")
    return qkv


def mlp_out(attn: torch.Tensor, x: torch.Tensor, w_o: torch.Tensor, norm_weight: torch.Tensor,
            eps: float, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """attn (T, H*D), the layer's input x (T, C) -> s + down(silu(gate) * up) (T, C), where
    s = x + attn @ w_o.T and [gate, up] = rms_norm(s) @ w_gate_up.T. Only where `applies`."""
    rows, width = x.shape
    inter = w_down.shape[1]
    if (attn.dim() != 2 or attn.shape[0] != rows or w_o.shape != (width, attn.shape[1])
            or norm_weight.shape != (width,) or w_gate_up.shape != (2 * inter, width)
            or w_down.shape != (width, inter) or attn.dtype != torch.bfloat16):
        raise ValueError(f"mlp_out: attn {tuple(attn.shape)}, x {tuple(x.shape)}, w_o "
                         f"{tuple(w_o.shape)}, w_gate_up {tuple(w_gate_up.shape)}, w_down "
                         f"{tuple(w_down.shape)}")
    attn, x = attn.contiguous(), x.contiguous()
    out = torch.empty_like(x)
    _check(_MLP_OUT.get()(attn.data_ptr(), x.data_ptr(), w_o.data_ptr(), norm_weight.data_ptr(),
                          eps, w_gate_up.data_ptr(), w_down.data_ptr(), out.data_ptr(), rows,
                          width, attn.shape[1], inter, torch.get_num_threads()), "mlp_out")
    return out


_DECODE_LAYERS = library.Entry(
    "llama_decode_layers_bf16",
    [_ptr] * 4 + [_c_int] * 7 + [_c_float, _c_int] + [_ptr] * 3 + [_c_int] * 3
    + [_c_float, ctypes.c_int64, _c_int])
CACHE_FORMATS = {torch.float32: 0, torch.bfloat16: 4}  # paged_decode.c's format numbers
MAX_HEAD_DIM = 512  # paged_decode.c's per-thread row buffers


def decode_layers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  layers: list[tuple[torch.Tensor, ...]], num_heads: int, head_dim: int,
                  eps: float, slots: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float, null_block: int
                  ) -> torch.Tensor | None:
    """Every decoder layer of a decode-only step in one C call: x (B, C), one token per request
    -> the last layer's output (B, C). `layers[i]` is layer i's (input norm, q/k/v, output, MLP
    norm, gate/up, down weights, K cache, V cache), caches (Hk, num_blocks, bs, D) fp32 or bf16;
    slots (B,), block_tables (B, n) and context_lens (B,) are the step's int64 attention
    metadata. None (nothing written) where the call does not apply: the caller then runs the
    layers one by one, with the same results. Only where `applies(x)`."""
    rows, width = x.shape
    k0 = layers[0][6]
    num_kv_heads, num_blocks, block_size, _ = k0.shape
    inter = layers[0][5].shape[1]
    qkv_rows = (num_heads + 2 * num_kv_heads) * head_dim
    shapes = [(width,), (qkv_rows, width), (width, num_heads * head_dim), (width,),
              (2 * inter, width), (width, inter), k0.shape, k0.shape]
    fmt = CACHE_FORMATS.get(k0.dtype)
    if (fmt is None or k0.shape[3] != head_dim or head_dim > MAX_HEAD_DIM
            or num_heads % num_kv_heads
            or slots.shape != (rows,) or context_lens.shape != (rows,)
            or block_tables.dim() != 2 or block_tables.shape[0] != rows
            or any(t.dtype != torch.int64 or not t.is_contiguous()
                   for t in (slots, block_tables, context_lens))):
        return None
    ptrs = []
    for tensors in layers:
        for i, t in enumerate(tensors):
            if (t.shape != shapes[i] or t.dtype != (k0.dtype if i >= 6 else torch.bfloat16)
                    or not t.is_contiguous() or not t.is_cpu):
                return None
            ptrs.append(t.data_ptr())
    fn = _DECODE_LAYERS.get()
    if fn is None:
        return None
    out = x.clone(memory_format=torch.contiguous_format)  # updated in place, layer by layer
    cos = cos.reshape(rows, head_dim).to(torch.bfloat16).contiguous()
    sin = sin.reshape(rows, head_dim).to(torch.bfloat16).contiguous()
    table = (ctypes.c_void_p * len(ptrs))(*ptrs)  # alive until the call returns
    status = fn(
        out.data_ptr(), cos.data_ptr(), sin.data_ptr(), ctypes.addressof(table),
        len(layers), rows, width, num_heads, num_kv_heads, head_dim, inter, eps, fmt,
        slots.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(), num_blocks,
        block_size, block_tables.shape[1], scale, null_block, torch.get_num_threads())
    if status == -3:
        raise IndexError(f"decode step: a slot or block id outside the cache ({num_blocks} "
                         "blocks), or the attention kernel's scratch could not be allocated")
    _check(status, "decode_layers")
    return out
