"""RMSNorm for CPU bf16 activations (engine/cpu/rms_norm_bf16.c), optionally fused with the
residual add before it: one C call instead of a dozen small PyTorch ops a norm.

`rms_norm_bf16` returns None whenever the kernel does not serve the call (not CPU bf16, no
library, `KVLAB_DISABLE_CPU_KERNEL=1`); the caller then runs PyTorch's RMSNorm.
"""

from __future__ import annotations

import ctypes

import torch

from engine.cpu import library, tracks_grad

_ptr = ctypes.c_void_p


_ENTRY = library.Entry("rms_norm_bf16", [_ptr] * 5 + [ctypes.c_int, ctypes.c_int, ctypes.c_float])


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """RMSNorm(x) * weight for x (T, C) bf16, or, given `residual` (T, C), of s = x + residual
    (rounded to bf16 as PyTorch's add is): returns (normed, s), s None without a residual.
    None where the kernel does not apply."""
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not x.is_cpu
            or x.dim() != 2 or (residual is not None and (residual.shape != x.shape
                                                          or residual.dtype != x.dtype))
            or tracks_grad(x, weight)):
        return None
    fn = _ENTRY.get()
    if fn is None:
        return None
    rows, width = x.shape
    if weight.shape != (width,):
        raise ValueError(f"rms_norm_bf16: x is (T, {width}) but weight is {tuple(weight.shape)}")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    total = None
    if residual is not None:
        residual, total = residual.contiguous(), torch.empty_like(x)
    status = fn(x.data_ptr(), None if residual is None else residual.data_ptr(),
                None if total is None else total.data_ptr(), weight.data_ptr(), out.data_ptr(),
                rows, width, eps)
    if status != 0:
        return None  # wider than the kernel's row buffer: PyTorch's norm serves it
    return out, total
