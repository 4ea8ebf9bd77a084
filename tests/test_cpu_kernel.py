"""The fused CPU decode kernel equals the PyTorch decode path and dense SDPA, and every way it
can be unavailable falls back to PyTorch instead of failing."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from engine.attention import cpu_kernel, paged
from engine.attention.backends import CpuKernelAttention
from engine.attention.metadata import AttentionMetadata
from engine.cpu import library
from engine.kv_cache.spec import full_attention_spec
from engine.kv_cache.storage import LayerCache

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(),
                                  reason="CPU decode kernel could not be built (no gcc?)")


def make_case(batch: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
              context_lens: list[int], seed: int) -> dict:
    """Scattered, shuffled block tables padded with block 0, over a cache full of random data
    (slots past each context hold garbage that must not leak in)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(batch, max(need), dtype=torch.int64)  # padding: block 0
    for r, n in enumerate(need):
        tables[r, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    return dict(q=torch.randn(batch, heads, head_dim, generator=gen), k_cache=k_cache,
                v_cache=v_cache, tables=tables,
                lens=torch.tensor(context_lens, dtype=torch.int64), scale=head_dim**-0.5)


def dense_reference(c: dict) -> torch.Tensor:
    """Each request's K/V gathered to (Hk, L, D) and attended with SDPA -> (B, H, D)."""
    hk, _, bs, d = c["k_cache"].shape
    outs = []
    for r, n in enumerate(c["lens"].tolist()):
        ids = c["tables"][r, :-(-n // bs)]
        k = c["k_cache"][:, ids].reshape(hk, -1, d)[:, :n]  # (Hk, L, D)
        v = c["v_cache"][:, ids].reshape(hk, -1, d)[:, :n]
        o = F.scaled_dot_product_attention(c["q"][r][None, :, None], k[None], v[None],
                                           scale=c["scale"], enable_gqa=True)  # (1, H, 1, D)
        outs.append(o[0, :, 0])
    return torch.stack(outs)


def torch_path(c: dict) -> torch.Tensor:
    bias = paged.decode_attn_bias(c["lens"], c["tables"], c["k_cache"].shape[2], -1,
                                  torch.float32)
    return paged.decode_attention(c["q"], c["k_cache"], c["v_cache"], c["tables"], bias,
                                  c["scale"])


def layer_cache(c: dict) -> LayerCache:
    """The case's caches as one layer's share (no null block: -1 is never a table entry)."""
    hk, _, bs, d = c["k_cache"].shape
    return LayerCache(0, 0, range(hk), full_attention_spec(hk, d, bs, "fp32"),
                      {"k": c["k_cache"], "v": c["v_cache"]}, null_block=-1)


def kernel_backend_forward(c: dict, meta: AttentionMetadata) -> torch.Tensor:
    empty = torch.zeros(0, c["k_cache"].shape[0], c["k_cache"].shape[3])
    return CpuKernelAttention(c["scale"]).forward(c["q"], empty, empty, layer_cache(c), meta)


def kernel(c: dict) -> torch.Tensor | None:
    return cpu_kernel.paged_decode(c["q"], c["k_cache"], c["v_cache"], c["tables"], c["lens"],
                                   c["scale"])


CASES = [  # (batch, heads, kv_heads, head_dim, context lengths)
    (1, 9, 3, 64, [1]),
    (1, 9, 3, 64, [1000]),  # few (request, kv head) items: the context is split across threads
    (3, 4, 4, 16, [5, 17, 64]),  # group 1
    (4, 8, 2, 80, [33, 129, 250, 2]),  # group 4, D not a multiple of 16
    (8, 9, 3, 64, [1, 15, 16, 17, 63, 64, 65, 300]),
    (2, 12, 3, 16, [700, 513]),
]


@needs_kernel
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-Hk{c[2]}-D{c[3]}")
def test_kernel_matches_torch_path_and_dense(case, block_size):
    batch, heads, kv_heads, head_dim, lens = case
    c = make_case(batch, heads, kv_heads, head_dim, block_size, lens, seed=block_size + batch)
    out = kernel(c)
    assert out is not None and out.shape == (batch, heads, head_dim)
    torch.testing.assert_close(out, dense_reference(c), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch_path(c), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_and_context_splits_agree(threads):
    """Splitting a long context over threads merges partial softmaxes; any split must agree."""
    c = make_case(2, 9, 3, 64, 16, [1500, 37], seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = kernel(c)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, dense_reference(c), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_engine_decode_dispatches_to_kernel(monkeypatch):
    c = make_case(2, 4, 2, 16, 16, [20, 40], seed=1)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.int64),
                             decode_context_lens=c["lens"], decode_block_tables=c["tables"])
    calls = []
    real = cpu_kernel.paged_decode
    monkeypatch.setattr(cpu_kernel, "paged_decode", lambda *a: calls.append(1) or real(*a))
    out = kernel_backend_forward(c, meta)
    assert calls and meta.decode_attn_bias is None  # the PyTorch path never ran
    torch.testing.assert_close(out, dense_reference(c), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_bad_block_id_raises_instead_of_reading_wild_memory():
    c = make_case(1, 4, 2, 16, 16, [40], seed=2)
    c["tables"][0, 1] = c["k_cache"].shape[1] + 5
    with pytest.raises(IndexError):
        kernel(c)


def test_disabled_by_env_falls_back(monkeypatch, fresh_cpu_library):
    monkeypatch.setenv(library.DISABLE_ENV, "1")
    c = make_case(2, 4, 2, 16, 16, [20, 40], seed=4)
    assert kernel(c) is None
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.int64),
                             decode_context_lens=c["lens"], decode_block_tables=c["tables"])
    out = kernel_backend_forward(c, meta)
    assert meta.decode_attn_bias is not None  # the PyTorch path ran
    torch.testing.assert_close(out, dense_reference(c), atol=1e-5, rtol=1e-5)


def test_bf16_falls_back():
    c = make_case(2, 4, 2, 16, 16, [20, 40], seed=5)
    for name in ("q", "k_cache", "v_cache"):
        c[name] = c[name].bfloat16()
    assert kernel(c) is None


def test_failing_compiler_warns_once_and_falls_back(monkeypatch, fresh_cpu_library, caplog):
    monkeypatch.setattr(library, "COMPILER", ["false"])  # exits 1, like a broken build
    c = make_case(2, 4, 2, 16, 16, [20, 40], seed=6)
    with caplog.at_level(logging.WARNING, logger=library.__name__):
        assert kernel(c) is None
        assert kernel(c) is None  # the failure is remembered: no second build, no second log
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PyTorch path" in warnings[0].getMessage()
    assert not list(library.library_path().parent.glob("*"))  # no half-written library


def test_missing_compiler_falls_back(monkeypatch, fresh_cpu_library, caplog):
    monkeypatch.setattr(library, "COMPILER", ["kvlab-no-such-cc"])
    with caplog.at_level(logging.WARNING, logger=library.__name__):
        assert not cpu_kernel.available()
    assert "not found" in caplog.text


@needs_kernel
def test_build_is_cached_by_source_and_flags(fresh_cpu_library):
    assert cpu_kernel.available()
    path = library.library_path()
    assert path.exists() and path.parent.name == "kernels"
    library.reset()
    mtime = path.stat().st_mtime_ns
    assert cpu_kernel.available() and path.stat().st_mtime_ns == mtime  # loaded, not rebuilt
