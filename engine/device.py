"""Device and dtype names from a RunConfig, resolved to torch objects."""

from __future__ import annotations

import torch

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class DeviceError(ValueError):
    """The requested device cannot be used on this machine."""


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for 'cuda' without one is an error, not a fallback,
    so a run never silently measures the wrong machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("no CUDA device found; use device 'cpu' or 'auto'")
        return torch.device("cuda")
    raise DeviceError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda'")


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> 'fp32' | 'bf16' | 'fp16' (the names RunConfig uses)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"no name for dtype {dtype}")
