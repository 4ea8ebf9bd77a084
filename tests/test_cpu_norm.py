"""RMSNorm (and residual add) of bf16 rows in one C pass (engine/cpu/rms_norm_bf16.c) against
PyTorch's RMSNorm, and the cases that keep PyTorch's path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.cpu import library, norm
from engine.models.llama import rms_norm

needs_library = pytest.mark.skipif(library.load() is None, reason="no CPU library (no gcc?)")


def make_norm(width: int, seed: int) -> nn.RMSNorm:
    g = torch.Generator().manual_seed(seed)
    module = nn.RMSNorm(width, eps=1e-5).bfloat16().requires_grad_(False)  # as loaded
    module.weight.data = (torch.randn(width, generator=g) * 0.3 + 1).bfloat16()
    return module


def exact(total: torch.Tensor, module: nn.RMSNorm) -> torch.Tensor:
    s = total.float()
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight.float()


@needs_library
@pytest.mark.parametrize("rows, width", [(1, 576), (7, 960), (300, 64), (2, 8192)])
def test_fused_add_and_norm_match_pytorch(rows, width):
    module = make_norm(width, seed=rows)
    g = torch.Generator().manual_seed(width)
    x = torch.randn(rows, width, generator=g).bfloat16()
    residual = (torch.randn(rows, width, generator=g) * 4).bfloat16()
    got = norm.rms_norm_bf16(x, module.weight, module.eps, residual)
    assert got is not None
    normed, total = got
    assert torch.equal(total, x + residual)  # the sum rounds exactly as PyTorch's bf16 add
    want = exact(total, module)
    # one rounding to bf16 at the end: within a bf16 step of the exact fp32 norm
    torch.testing.assert_close(normed.float(), want, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(normed, module(x + residual), rtol=2**-7, atol=1e-5)
    alone, none = norm.rms_norm_bf16(x, module.weight, module.eps)
    assert none is None
    torch.testing.assert_close(alone.float(), exact(x, module), rtol=2**-8, atol=1e-6)


@needs_library
def test_llama_helper_uses_the_kernel_but_lets_hooks_fire(monkeypatch):
    module = make_norm(64, seed=1)
    x = torch.randn(3, 64).bfloat16()
    calls = []
    real = norm.rms_norm_bf16
    monkeypatch.setattr(norm, "rms_norm_bf16", lambda *a, **k: calls.append(1) or real(*a, **k))
    rms_norm(module, x)
    assert calls == [1]
    seen = []
    module.register_forward_hook(lambda mod, args, out: seen.append(out))
    normed, total = rms_norm(module, x, residual=x)
    assert calls == [1] and len(seen) == 1  # a hooked norm runs as a module
    assert torch.equal(seen[0], normed) and torch.equal(total, x + x)


def test_what_the_kernel_does_not_serve_runs_pytorch():
    module = make_norm(64, seed=2)
    assert norm.rms_norm_bf16(torch.randn(2, 64), module.weight.float(), 1e-5) is None  # fp32
    wide = make_norm(8193, seed=3)
    x = torch.randn(1, 8193).bfloat16()
    assert norm.rms_norm_bf16(x, wide.weight, wide.eps) is None  # wider than its row buffer
    normed, total = rms_norm(wide, x)
    assert torch.equal(normed, wide(x)) and total is x


def test_disabled_library_runs_pytorch(monkeypatch, fresh_cpu_library):
    monkeypatch.setenv(library.DISABLE_ENV, "1")
    module = make_norm(64, seed=4)
    x, r = torch.randn(2, 64).bfloat16(), torch.randn(2, 64).bfloat16()
    assert norm.rms_norm_bf16(x, module.weight, module.eps, r) is None
    normed, total = rms_norm(module, x, residual=r)
    assert torch.equal(total, x + r) and torch.equal(normed, module(x + r))
