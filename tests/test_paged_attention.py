"""Paged attention through scattered block tables equals dense SDPA on contiguous K/V, for
each backend chosen explicitly (so every path runs on every machine), with null blocks too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import cpu_kernel, paged
from engine.attention.backends import CpuKernelAttention, TorchPagedAttention, select_backend
from engine.attention.metadata import AttentionMetadata
from engine.kv_cache.storage import PagedKVCache
from engine.models.config import TINY_LLAMA

H, HK, D = 4, 2, 16  # TINY_LLAMA's attention shapes: 2 query heads per KV head
SCALE = D**-0.5


def backend_for(name: str) -> TorchPagedAttention:
    """One backend, forced: the kernel path must not hide the PyTorch one or the reverse."""
    if name == "torch":
        return TorchPagedAttention(SCALE, paged.Workspace())
    if not cpu_kernel.available():
        pytest.skip("the CPU decode kernel does not build here (no gcc?)")
    return _NoFallback(SCALE, paged.Workspace())


class _NoFallback(CpuKernelAttention):
    """The kernel backend, failing instead of quietly taking the PyTorch path."""

    def decode(self, q, cache, meta):
        out = cpu_kernel.paged_decode(q, cache["k"], cache["v"], meta.decode_block_tables,
                                      meta.decode_context_lens, self.scale, cache.null_block)
        assert out is not None, "the kernel declined a call it should serve"
        return out


def dense_reference(q, k, v, context_len):
    """q (Tq, H, D) at the last Tq positions of k/v (L, Hk, D), causal -> (Tq, H, D)."""
    tq = q.shape[0]
    rows = torch.arange(context_len - tq, context_len)
    mask = torch.arange(context_len) <= rows[:, None]  # (Tq, L)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=SCALE, enable_gqa=True)
    return out[0].transpose(0, 1)


def scattered_tables(lengths, block_size, num_blocks, gen):
    """Disjoint random block ids per request."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:
        need = -(-n // block_size)
        tables.append(torch.tensor(perm[:need], dtype=torch.int64))
        perm = perm[need:]
    return tables


def slots_for(table, positions, block_size):
    return table[positions // block_size] * block_size + positions % block_size


@pytest.mark.parametrize("backend", ["torch", "kernel"])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_chunked_prefill_then_decode_match_dense(block_size, backend):
    """Three requests: a first chunk, a second chunk over the cached prefix, then a mixed step
    (one prefill chunk + decodes) whose decode contexts end mid-block."""
    gen = torch.Generator().manual_seed(block_size)
    attention = backend_for(backend)
    lengths = [37, 130, 64]  # final context lengths; 37 and 130 end inside a block
    num_blocks = sum(-(-n // block_size) for n in lengths) + 8
    cache = PagedKVCache.for_model(TINY_LLAMA, num_blocks, block_size)
    layer = cache.layer_caches(0)[0]
    layer["k"][:, :num_blocks].normal_(generator=gen)  # stale data must not leak in
    layer["v"][:, :num_blocks].normal_(generator=gen)
    tables = scattered_tables(lengths, block_size, num_blocks, gen)
    qs = [torch.randn(n, H, D, generator=gen) for n in lengths]
    ks = [torch.randn(n, HK, D, generator=gen) for n in lengths]
    vs = [torch.randn(n, HK, D, generator=gen) for n in lengths]
    # computed tokens per request before each step, and tokens of each step
    plan = [[(0, 20), (0, 70), (0, 30)], [(20, 16), (70, 59), (30, 33)], [(36, 1), (129, 1),
                                                                         (63, 1)]]
    for step, items in enumerate(plan):
        sel = [(r, s, n) for r, (s, n) in enumerate(items)]
        # last step mixes a one-token prefill chunk (request 1) with two decodes
        pre = sel if step < 2 else [sel[1]]
        dec = [] if step < 2 else [sel[0], sel[2]]
        meta = build_meta(pre, dec, tables, block_size, cache.null_block)
        q = torch.cat([qs[r][s:s + n] for r, s, n in pre + dec])
        k = torch.cat([ks[r][s:s + n] for r, s, n in pre + dec])
        v = torch.cat([vs[r][s:s + n] for r, s, n in pre + dec])
        out = attention.forward(q, k, v, layer, meta)
        row = 0
        for r, s, n in pre + dec:
            want = dense_reference(qs[r][s:s + n], ks[r][:s + n], vs[r][:s + n], s + n)
            torch.testing.assert_close(out[row:row + n], want, atol=1e-5, rtol=1e-5)
            row += n


def build_meta(pre, dec, tables, block_size, null_block):
    """AttentionMetadata for prefill items then decode items, each (request, start, n)."""
    slots = [slots_for(tables[r], torch.arange(s, s + n), block_size) for r, s, n in pre + dec]
    max_blocks = max((-(-(s + 1) // block_size) for _, s, _ in dec), default=0)
    dec_tables = torch.full((len(dec), max_blocks), null_block, dtype=torch.int64)
    for i, (r, s, _) in enumerate(dec):
        need = -(-(s + 1) // block_size)
        dec_tables[i, :need] = tables[r][:need]
    return AttentionMetadata(
        slot_mapping=torch.cat(slots),
        num_prefill_tokens=sum(n for _, _, n in pre),
        prefill_query_lens=[n for _, _, n in pre],
        prefill_context_lens=[s + n for _, s, n in pre],
        prefill_block_tables=[tables[r] for r, _, _ in pre],
        decode_context_lens=torch.tensor([s + 1 for _, s, _ in dec], dtype=torch.int64),
        decode_block_tables=dec_tables,
    )


@pytest.mark.parametrize("backend,chunk_bytes", [("torch", None), ("torch", 1), ("kernel", None)])
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("context_lens", [[1, 5, 17], [64, 65, 200, 129], [300]])
def test_batched_decode_matches_dense(block_size, context_lens, backend, chunk_bytes,
                                      monkeypatch):
    if chunk_bytes is not None:  # 1: one request per CPU decode chunk
        monkeypatch.setattr(paged, "DECODE_CHUNK_BYTES", chunk_bytes)
    attention = backend_for(backend)
    gen = torch.Generator().manual_seed(len(context_lens) * 100 + block_size)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 4
    cache = PagedKVCache.for_model(TINY_LLAMA, num_blocks, block_size)
    layer = cache.layer_caches(1)[0]
    tables = scattered_tables(context_lens, block_size, num_blocks, gen)
    ks = [torch.randn(n, HK, D, generator=gen) for n in context_lens]
    vs = [torch.randn(n, HK, D, generator=gen) for n in context_lens]
    # the model runner zeroes a block when it receives its first token: never-written memory
    # may hold NaN bit patterns, and a masked position still multiplies V by 0
    cache.zero_blocks(torch.cat(tables))
    # fill the prefixes through the write path, as earlier steps would have
    for t, k, v in zip(tables, ks, vs, strict=True):
        slots = slots_for(t, torch.arange(k.shape[0] - 1), block_size)
        paged.write_kv(layer["k"], layer["v"], k[:-1], v[:-1], slots)
    q = torch.randn(len(context_lens), H, D, generator=gen)
    meta = build_meta([], [(r, n - 1, 1) for r, n in enumerate(context_lens)], tables,
                      block_size, cache.null_block)
    out = attention.forward(q, torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs]),
                            layer, meta)
    for r, n in enumerate(context_lens):
        want = dense_reference(q[r:r + 1], ks[r], vs[r], n)
        torch.testing.assert_close(out[r:r + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_null_blocks_are_masked_in_decode_and_prefill(backend):
    """Blocks given back mid-request leave the null block in the table: attention equals dense
    attention over the tokens that remain, whatever the null page holds."""
    attention, bs, gen = backend_for(backend), 4, torch.Generator().manual_seed(5)
    cache = PagedKVCache.for_model(TINY_LLAMA, 16, bs)
    layer, null = cache.layer_caches(0)[0], cache.null_block
    n = 22  # 6 blocks, the last partly filled
    table = torch.randperm(16, generator=gen)[:6]
    k, v = torch.randn(n, HK, D, generator=gen), torch.randn(n, HK, D, generator=gen)
    cache.zero_blocks(table)
    paged.write_kv(layer["k"], layer["v"], k, v, slots_for(table, torch.arange(n), bs))
    gone = [1, 3]  # a retention policy gave these blocks back
    holed = table.clone()
    holed[gone] = null
    layer["k"][:, null].fill_(1e4)  # nothing of the null page may be read or weighted
    kept = torch.tensor([i for i in range(n) if i // bs not in gone])
    q = torch.randn(1, H, D, generator=gen)
    want = dense_reference(q, k[kept], v[kept], len(kept))
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.int64),
                             decode_context_lens=torch.tensor([n]),
                             decode_block_tables=holed[None])
    empty = torch.zeros(0, HK, D)
    torch.testing.assert_close(attention.decode(q, layer, meta), want, atol=1e-5, rtol=1e-5)
    # a prefill chunk of the last 2 tokens over the holed context
    q2 = torch.randn(2, H, D, generator=gen)
    got = paged.prefill_attention(q2, empty, empty, layer["k"], layer["v"], holed, n, SCALE,
                                  null)
    for i, pos in enumerate((n - 2, n - 1)):
        keep = kept[kept <= pos]
        torch.testing.assert_close(got[i:i + 1], dense_reference(q2[i:i + 1], k[keep], v[keep],
                                                                 len(keep)),
                                   atol=1e-5, rtol=1e-5)


def test_cache_sizes_and_null_page_is_zero():
    cache = PagedKVCache.for_model(TINY_LLAMA, 10, 16, "bf16")
    per_token = 2 * TINY_LLAMA.num_layers * TINY_LLAMA.num_kv_heads * TINY_LLAMA.head_dim * 2
    assert cache.page_size_bytes == 16 * per_token
    assert cache.capacity_bytes == 10 * 16 * per_token
    assert cache.allocated_bytes == 11 * 16 * per_token  # + the null page
    assert (cache.storage["k"][:, :, cache.null_block] == 0).all()


def test_backend_choice():
    spec = TINY_LLAMA.kv_cache_spec(16, "fp32")
    chosen = select_backend(spec, torch.device("cpu"), SCALE, None)
    assert isinstance(chosen, CpuKernelAttention) == cpu_kernel.available()
    bf16 = select_backend(TINY_LLAMA.kv_cache_spec(16, "bf16"), torch.device("cpu"), SCALE, None)
    assert isinstance(bf16, CpuKernelAttention) == cpu_kernel.available()  # widened in C
    int8 = select_backend(TINY_LLAMA.kv_cache_spec(16, "int8"), torch.device("cpu"), SCALE, None)
    assert int8.name == ("cpu-kernel-quantized" if cpu_kernel.available() else "torch-quantized")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_widens_half_caches_like_the_torch_path(dtype):
    if not cpu_kernel.available():
        pytest.skip("the CPU decode kernel does not build here")
    gen = torch.Generator().manual_seed(11)
    cache = PagedKVCache.for_model(TINY_LLAMA, 16, 16, {torch.bfloat16: "bf16",
                                                        torch.float16: "fp16"}[dtype])
    layer = cache.layer_caches(0)[0]
    layer["k"][:, :16].copy_(torch.randn(HK, 16, 16, D, generator=gen).to(dtype))
    layer["v"][:, :16].copy_(torch.randn(HK, 16, 16, D, generator=gen).to(dtype))
    tables = torch.tensor([[3, 7, 1], [9, 2, cache.null_block]])
    lens = torch.tensor([40, 20])
    q = torch.randn(2, H, D, generator=gen)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long),
                             decode_context_lens=lens, decode_block_tables=tables)
    want = TorchPagedAttention(SCALE).decode(q, layer, meta)
    got = cpu_kernel.paged_decode_half(q, layer["k"], layer["v"], tables, lens, SCALE,
                                       cache.null_block)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def run_decode(dtype, device, block_size=16, context_lens=(5, 40, 100)):
    """Batched decode through scattered tables; returns (output, dense fp32 reference)."""
    gen = torch.Generator().manual_seed(7)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 4
    kv_dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    cache = PagedKVCache.for_model(TINY_LLAMA, num_blocks, block_size, kv_dtype, device)
    layer = cache.layer_caches(0)[0]
    tables = scattered_tables(context_lens, block_size, num_blocks, gen)
    ks = [torch.randn(n, HK, D, generator=gen) for n in context_lens]
    vs = [torch.randn(n, HK, D, generator=gen) for n in context_lens]
    cache.zero_blocks(torch.cat(tables).to(device))
    for t, k, v in zip(tables, ks, vs, strict=True):
        slots = slots_for(t, torch.arange(k.shape[0]), block_size).to(device)
        paged.write_kv(layer["k"], layer["v"], k.to(device, dtype), v.to(device, dtype), slots)
    q = torch.randn(len(context_lens), H, D, generator=gen)
    meta = build_meta([], [(r, n - 1, 1) for r, n in enumerate(context_lens)], tables,
                      block_size, cache.null_block)
    meta.slot_mapping = torch.zeros(0, dtype=torch.int64)  # K/V already written above
    for name in ("slot_mapping", "decode_context_lens", "decode_block_tables"):
        setattr(meta, name, getattr(meta, name).to(device))
    empty = torch.zeros(0, HK, D, dtype=dtype, device=device)
    attention = select_backend(cache.spec, torch.device(device), SCALE, paged.Workspace())
    out = attention.forward(q.to(device, dtype), empty, empty, layer, meta)
    want = torch.cat([dense_reference(q[r:r + 1], ks[r], vs[r], n)
                      for r, n in enumerate(context_lens)])
    return out.float().cpu(), want


def test_bf16_decode_is_close_to_fp32():
    out, want = run_decode(torch.bfloat16, torch.device("cpu"))
    torch.testing.assert_close(out, want, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_matches_dense(dtype):
    out, want = run_decode(dtype, torch.device("cuda"))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
