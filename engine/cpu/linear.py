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
# registers, beats this kernel's row-by-row dot products. All of SmolLM2's matmuls on the
# 2-core EPYC: 9.6 vs 24.5 ms at 1 row, 19.5 vs 28.5 at 8, 38.0 vs 34.4 at 16.
MAX_ROWS = 12
_ptr, _c_int = ctypes.c_void_p, ctypes.c_int


class _Entry:
    """`linear_bf16` of the loaded library, or None (unavailable, or built without
    AVX512-BF16: learnt from the kernel's -2 on the first call)."""

    def __init__(self) -> None:
        self.lib: ctypes.CDLL | None = None
        self.fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]

    def get(self) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
        lib = library.load()
        if lib is not self.lib:
            self.lib, self.fn = lib, None
            if lib is not None:
                fn = lib.linear_bf16
                fn.argtypes, fn.restype = [_ptr] * 3 + [_c_int] * 4, _c_int
                self.fn = fn if fn(None, None, None, 0, 0, 0, 1) != -2 else None
        return self.fn


_ENTRY = _Entry()


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
