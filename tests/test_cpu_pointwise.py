"""SwiGLU's silu * up and RoPE on bf16 in one C pass each (engine/cpu/pointwise_bf16.c)
against the fp32 result and PyTorch's bf16 ops, and the calls that keep PyTorch's path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.cpu import library, pointwise
from engine.models.llama import apply_rope

needs_library = pytest.mark.skipif(library.load() is None, reason="no CPU library (no gcc?)")


def bf16_step_close(got: torch.Tensor, exact: torch.Tensor, scale: float) -> None:
    """Within one bf16 rounding of the exact value (relative 2^-8, absolute for values near 0)."""
    torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=scale * 2**-8)


@needs_library
@pytest.mark.parametrize("rows, inter", [(1, 1536), (5, 7), (64, 256)])
def test_silu_mul_is_one_rounding_of_the_exact_value(rows, inter):
    gate_up = (torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(rows)) * 3
               ).bfloat16()
    got = pointwise.silu_mul_bf16(gate_up)
    gate, up = gate_up.float().chunk(2, dim=-1)
    bf16_step_close(got, F.silu(gate) * up, scale=1.0)
    g16, u16 = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(got, F.silu(g16) * u16, rtol=2**-6, atol=2**-6)  # PyTorch's


@needs_library
@pytest.mark.parametrize("rows, heads, total, width", [(1, 12, 15, 64), (9, 4, 4, 128),
                                                        (3, 0, 2, 8)])
def test_rope_rotates_only_the_first_heads_in_place(rows, heads, total, width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(rows, total, width, generator=g).bfloat16()
    cos = torch.randn(rows, 1, width, generator=g).bfloat16()
    sin = torch.randn(rows, 1, width, generator=g).bfloat16()
    before = x.clone()
    assert pointwise.rope_bf16(x, heads, cos, sin)
    exact = apply_rope(before[:, :heads].float(), cos.float(), sin.float())
    bf16_step_close(x[:, :heads], exact, scale=4.0)
    assert torch.equal(x[:, heads:], before[:, heads:])  # v (and any head past `heads`) intact


def test_calls_the_kernels_do_not_serve():
    assert pointwise.silu_mul_bf16(torch.randn(2, 8)) is None  # fp32
    assert pointwise.silu_mul_bf16(torch.randn(2, 7).bfloat16()) is None  # odd width
    assert pointwise.silu_mul_bf16(torch.randn(8, 2).bfloat16().t()) is None  # not contiguous
    x = torch.randn(2, 3, 8).bfloat16()
    cos = torch.ones(2, 1, 8).bfloat16()
    assert not pointwise.rope_bf16(x.float(), 2, cos.float(), cos.float())
    assert not pointwise.rope_bf16(x, 4, cos, cos)  # more heads than there are
    assert not pointwise.rope_bf16(x, 2, cos[:, :, :4], cos[:, :, :4])  # tables too narrow
    assert not pointwise.rope_bf16(x.transpose(0, 1), 2, cos, cos)


def test_disabled_library_leaves_pytorch_to_do_it(monkeypatch, fresh_cpu_library):
    monkeypatch.setenv(library.DISABLE_ENV, "1")
    x = torch.randn(2, 3, 8).bfloat16()
    before = x.clone()
    cos = torch.ones(2, 1, 8).bfloat16()
    assert pointwise.silu_mul_bf16(torch.randn(2, 8).bfloat16()) is None
    assert not pointwise.rope_bf16(x, 2, cos, cos) and torch.equal(x, before)
