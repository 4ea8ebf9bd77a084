"""The bf16 decode matmul kernel (engine/cpu/linear_bf16.c) against PyTorch, and every way it
can be unavailable falling back to F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.cpu import library, linear
from engine.models import llama

needs_kernel = pytest.mark.skipif(not linear.available(),
                                  reason="no AVX512-BF16 on this CPU, or no gcc")


def operands(rows: int, out_features: int, in_features: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    w = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).bfloat16()
    return x, w


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 8, linear.MAX_ROWS])
@pytest.mark.parametrize("out_features, in_features",
                         [(960, 576), (576, 1536), (49152, 64), (7, 33), (131, 1000), (1, 31)])
def test_kernel_matches_fp32_to_bf16_rounding(rows, out_features, in_features):
    x, w = operands(rows, out_features, in_features, seed=rows * 7 + in_features)
    got = linear.linear_bf16(x, w)
    assert got is not None and got.dtype == torch.bfloat16
    assert got.shape == (rows, out_features)
    exact = F.linear(x.float(), w.float())
    # the fp32 sums differ from PyTorch's only in order; the result is then rounded to bf16
    # (relative step 2^-8), so every element is within one bf16 step of the exact sum
    torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(got, F.linear(x, w), rtol=2**-7, atol=1e-5)


@needs_kernel
def test_kernel_reads_only_its_rows_and_special_values():
    x, w = operands(3, 100, 64, seed=1)
    x[1, 5] = float("inf")
    got = linear.linear_bf16(x, w)
    assert torch.isinf(got[1]).sum() + torch.isnan(got[1]).sum() == 100  # inf * w spreads
    torch.testing.assert_close(got[[0, 2]].float(), F.linear(x[[0, 2]].float(), w.float()),
                               rtol=2**-8, atol=1e-6)


def test_calls_it_does_not_serve_return_none():
    x, w = operands(4, 64, 32, seed=2)
    assert linear.linear_bf16(x.float(), w.float()) is None  # fp32: MKL's path
    assert linear.linear_bf16(x, w.half()) is None
    big, w = operands(linear.MAX_ROWS + 1, 64, 32, seed=3)
    assert linear.linear_bf16(big, w) is None  # a prefill chunk: oneDNN's GEMM


@needs_kernel
def test_mismatched_shapes_are_refused_not_read_out_of_bounds():
    x, _ = operands(4, 64, 32, seed=2)
    with pytest.raises(ValueError, match="weight is"):
        linear.linear_bf16(x, torch.zeros(64, 31, dtype=torch.bfloat16))


@needs_kernel
def test_llama_linear_uses_the_kernel_for_decode_rows(monkeypatch):
    calls = []
    real = linear.linear_bf16
    monkeypatch.setattr(linear, "linear_bf16", lambda x, w: calls.append(x.shape) or real(x, w))
    x, w = operands(2, 96, 64, seed=4)
    torch.testing.assert_close(llama.linear(x, w), F.linear(x, w), rtol=2**-7, atol=1e-5)
    assert calls == [(2, 64)]


def test_disabled_by_env_falls_back_to_f_linear(monkeypatch, fresh_cpu_library):
    monkeypatch.setenv(library.DISABLE_ENV, "1")
    assert not linear.available()
    x, w = operands(1, 96, 64, seed=5)
    assert linear.linear_bf16(x, w) is None
    assert torch.equal(llama.linear(x, w), F.linear(x, w))


def test_a_cpu_without_avx512_bf16_falls_back(monkeypatch, fresh_cpu_library):
    """Built without the instructions (as on a CPU that lacks them), the kernel says so and
    the caller keeps F.linear; the decode kernel in the same library still serves."""
    if library.load() is None:
        pytest.skip("the CPU library does not build here (no gcc?)")
    library.reset()
    monkeypatch.setattr(library, "CFLAGS", [*library.CFLAGS, "-mno-avx512bf16"])
    assert library.load() is not None
    assert not linear.available()
    x, w = operands(1, 96, 64, seed=6)
    assert linear.linear_bf16(x, w) is None
    assert torch.equal(llama.linear(x, w), F.linear(x, w))


def test_calls_autograd_follows_stay_with_pytorch():
    x, w = operands(1, 32, 64, seed=7)
    w.requires_grad_(True)
    assert linear.linear_bf16(x, w) is None  # autograd would see nothing the kernel did
    with torch.no_grad():
        assert (linear.linear_bf16(x, w) is not None) == linear.available()
