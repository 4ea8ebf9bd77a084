"""SwiGLU's silu(gate) * up and RoPE for CPU bf16 activations (engine/cpu/pointwise_bf16.c):
one C call each instead of three and six small PyTorch ops.

Each function returns None (`rope_bf16`: False) whenever the kernel does not serve the call
(not CPU bf16, an unexpected layout, no library, `KVLAB_DISABLE_CPU_KERNEL=1`); the caller
then runs its PyTorch ops.
"""

from __future__ import annotations

import ctypes

import torch

from engine.cpu import library, tracks_grad

_ptr, _c_int = ctypes.c_void_p, ctypes.c_int


_SILU_MUL = library.Entry("silu_mul_bf16", [_ptr] * 2 + [_c_int] * 2, restype=None)
_ROPE = library.Entry("rope_bf16", [_ptr] * 3 + [_c_int] * 4, restype=None)


def _is_cpu_bf16(*tensors: torch.Tensor) -> bool:
    """CPU bf16 tensors that autograd does not follow: what the kernels may serve."""
    return all(t.dtype == torch.bfloat16 and t.is_cpu for t in tensors) and not tracks_grad(
        *tensors)


def silu_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor | None:
    """gate_up (T, 2I), gate first -> silu(gate) * up (T, I); None where it does not apply."""
    if (not _is_cpu_bf16(gate_up) or gate_up.dim() != 2 or gate_up.shape[1] % 2
            or not gate_up.is_contiguous()):
        return None
    fn = _SILU_MUL.get()
    if fn is None:
        return None
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=torch.bfloat16)
    fn(gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
    return out


def rope_bf16(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate the first `heads` heads of x (T, heads_total, D) in place by cos, sin (T, 1, D)
    or (T, D); False (x untouched) where the kernel does not apply."""
    if not _is_cpu_bf16(x, cos, sin) or x.dim() != 3 or not x.is_contiguous():
        return False
    rows, heads_total, width = x.shape
    cos, sin = cos.reshape(rows, -1), sin.reshape(rows, -1)
    if (cos.shape != (rows, width) or sin.shape != (rows, width) or width % 2
            or not 0 <= heads <= heads_total):
        return False
    fn = _ROPE.get()
    if fn is None:
        return False
    cos, sin = cos.contiguous(), sin.contiguous()
    fn(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows, heads, heads_total, width)
    return True
