"""The bf16 decode matmul on CPU (engine/cpu/linear_bf16.c): `y = x @ weight.T` for the few
token rows of a decode step, reading each weight once at close to the machine's read bandwidth.

`linear_bf16` returns None whenever the kernel does not serve the call (not CPU bf16, more rows
than `MAX_ROWS`, a CPU without AVX512-BF16, no library, `KVLAB_DISABLE_CPU_KERNEL=1`); the
caller then runs F.linear. Which CPUs qualify is decided by the build (`-march=native`): the
kernel itself reports that it was built without the instructions.
"""

from __future__ import annotations

import ctypes

import torch

from engine.cpu import library, tracks_grad

# Above this many rows oneDNN's blocked GEMM, which reuses each weight tile across rows from
# registers more than this kernel's 4x4 tiles do, catches up. All of SmolLM2's layer matmuls on
# the 2-core EPYC, kernel vs F.linear (bench/cpu_decode.py): 1 row 7.5 vs 15.5 ms, 8 rows 11.7
# vs 18.6, 16 rows 14.8 vs 22.3, 32 rows 26.0 vs 29.8.
MAX_ROWS = 32
_ptr, _c_int = ctypes.c_void_p, ctypes.c_int


# built without AVX512-BF16, the kernel answers -2 (a call with no rows reads nothing)
_ENTRY = library.Entry("linear_bf16", [_ptr] * 3 + [_c_int] * 4,
                       usable=lambda fn: fn(None, None, None, 0, 0, 0, 1) != -2)


def available() -> bool:
    """Whether this CPU runs the kernel (building the library now if needed)."""
    return _ENTRY.get() is not None


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x (T, in) @ weight (out, in).T -> (T, out) bf16, fp32 accumulation; None where the
    kernel does not apply. Called for every Linear of every decode step: cheap checks only."""
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not x.is_cpu
            or x.dim() != 2 or x.shape[0] > MAX_ROWS or x.shape[0] == 0
            or tracks_grad(x, weight)):
        return None
    fn = _ENTRY.get()
    if fn is None:
        return None
    rows, width = x.shape
    out_features, in_features = weight.shape
    if in_features != width:
        raise ValueError(f"linear_bf16: x is (T, {width}) but weight is "
                         f"({out_features}, {in_features})")
    x, weight = x.contiguous(), weight.contiguous()  # no-ops for the engine's tensors
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    status = fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, out_features, width,
                torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"linear_bf16: the worker pool could not allocate (status {status})")
    return out
