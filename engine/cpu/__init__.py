"""The lab's CPU kernels: C sources built into one shared library (library.py), whose worker
pool (pool.c) serves both paged decode attention (paged_decode.c, called through
engine/attention/cpu_kernel.py) and the bf16 decode matmuls (linear_bf16.c, linear.py); plus
the bf16 decode step's small ops, one C pass each: RMSNorm with its residual add
(rms_norm_bf16.c, norm.py), SwiGLU and RoPE (pointwise_bf16.c, pointwise.py); and a Llama
layer's work chained from them, every layer of a decode-only step in one call
(llama_layer_bf16.c, llama_layer.py). kernels.h declares what one C file calls in another."""

import torch


def tracks_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd follows any of these tensors: it would see nothing a C kernel computes,
    so such calls stay with PyTorch. The engine runs under inference_mode, where this is False."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
