"""Quantized KV blocks (fp8, int8, int4): round-trip error bounds, attention through quantized
blocks and the full-precision residual against a dense reference, the kernel against the
PyTorch path, bytes per block, and end-to-end runs with prefix hits and preemption."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_engine import assert_events_rebuild_keyframes

from engine.attention import cpu_kernel, paged
from engine.attention.metadata import AttentionMetadata
from engine.attention.quantized import QuantizedPagedAttention
from engine.config import ConfigError, RunConfig, SamplingConfig
from engine.kv_cache import quantize
from engine.kv_cache.storage import PagedKVCache
from engine.models.config import SMOLLM2_135M
from engine.quality import evaluate, held_set, passage_tokens
from engine.run import run
from engine.trace import ListSink
from engine.workload import WorkloadRequest

FORMATS = ("fp8", "int8", "int4")


@pytest.mark.parametrize("bits", [8, 4])
def test_kivi_round_trip_is_within_half_a_step(bits):
    """Keys per channel over the block's tokens, values per token over channel groups: every
    value comes back within half a quantization step of its group's range (+ fp16 rounding)."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 16, 64, generator=gen) * 3 + torch.randn(64, generator=gen) * 4
    steps = (1 << bits) - 1
    q, scale, lo = quantize.quantize_keys(x, bits)
    assert q.dtype == torch.uint8 and q.shape[-1] == 64 * bits // 8
    k = quantize.dequantize_keys(q, scale, lo, bits, torch.float32)
    span = x.amax(dim=-2, keepdim=True) - x.amin(dim=-2, keepdim=True)  # per channel
    assert ((k - x).abs() <= span / steps * 0.5 + 2e-3 * span + 1e-3).all()
    q, scale, lo = quantize.quantize_values(x, bits, group=32)
    v = quantize.dequantize_values(q, scale, lo, bits, torch.float32)
    groups = x.view(3, 5, 16, 2, 32)
    span = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)).expand_as(groups)
    assert ((v - x).abs() <= span.reshape(x.shape) / steps * 0.5 + 2e-3 * span.reshape(
        x.shape) + 1e-3).all()


def test_fp8_is_e4m3_with_three_mantissa_bits_and_saturates():
    x = torch.tensor([1.0, 1.0625, 3.0, -448.0, 1000.0, 0.0])
    y = quantize.from_fp8(quantize.to_fp8(x), torch.float32)
    assert y.tolist() == [1.0, 1.0, 3.0, -448.0, 448.0, 0.0]  # 1/16 is below 3 bits; clamped


def test_hadamard_rotation_is_orthonormal_and_keeps_scores():
    h = quantize.hadamard(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), atol=1e-6, rtol=0)
    gen = torch.Generator().manual_seed(1)
    k, q = torch.randn(8, 16, 64, generator=gen), torch.randn(64, generator=gen)
    torch.testing.assert_close((k @ h) @ (q @ h), k @ q, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="power-of-two"):
        quantize.hadamard(48)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rotated_cache_attends_like_the_exact_one(fmt):
    """Queries and keys are rotated together inside the backend, so attention is unchanged up
    to quantization error (whether rotation lowers that error is measured on the real model in
    bench/kv_quant.py, not assumed)."""
    gen = torch.Generator().manual_seed(3)
    cfg, context_len = SMOLLM2_135M, 53
    layer, backend, table, k, v, tail = write_context(fmt, cfg, 16, context_len, gen,
                                                      rotate=True)
    q = torch.randn(1, cfg.num_heads, cfg.head_dim, generator=gen)
    got = backend.decode(backend._rotate(q), layer, decode_meta(table, context_len, tail))
    exact = F.scaled_dot_product_attention(
        q[:, :, None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        scale=cfg.head_dim**-0.5, enable_gqa=True)[:, :, 0]
    assert (got - exact).abs().max() < {"fp8": 0.1, "int8": 0.02, "int4": 0.3}[fmt]


def write_context(fmt, config, block_size, context_len, gen, rotate=False):
    """Prefill one request's K/V through the quantized backend, as the runner would set it up;
    returns (cache share, backend, table, k, v, the open block's residual slot)."""
    h, hk, d = config.num_heads, config.num_kv_heads, config.head_dim
    cache = PagedKVCache.for_model(config, 64, block_size, fmt, rotate=rotate)
    layer, residual = cache.layer_caches(0)[0], cache.residual
    table = torch.randperm(64, generator=gen)[: -(-context_len // block_size)]
    k = torch.randn(context_len, hk, d, generator=gen)
    v = torch.randn(context_len, hk, d, generator=gen)
    pos = torch.arange(context_len)
    slots = table[pos // block_size] * block_size + pos % block_size
    blocks, offsets = (slots // block_size).numpy(), (slots % block_size).numpy()
    slot_of = {int(b): residual.slot_for(int(b)) for b in np.unique(blocks)}
    done = np.unique(blocks[offsets == block_size - 1])
    tail = slot_of[int(table[-1])] if context_len % block_size else -1
    meta = AttentionMetadata(
        slot_mapping=slots, num_prefill_tokens=context_len, prefill_query_lens=[context_len],
        prefill_context_lens=[context_len], prefill_block_tables=[table],
        residual_slot_mapping=torch.tensor([slot_of[int(b)] * block_size + o
                                            for b, o in zip(blocks, offsets, strict=True)]),
        complete_blocks=torch.tensor(done),
        complete_slots=torch.tensor([slot_of[int(b)] for b in done], dtype=torch.long),
        prefill_tail_slots=[tail])
    backend = QuantizedPagedAttention(cache.spec, d**-0.5, paged.Workspace())
    backend.forward(torch.randn(context_len, h, d, generator=gen), k, v, layer, meta)
    return layer, backend, table, k, v, tail


def decode_meta(table, context_len, tail):
    return AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long),
                             decode_context_lens=torch.tensor([context_len]),
                             decode_block_tables=table[None],
                             decode_tail_slots=torch.tensor([tail]))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("context_len", [48, 53])  # block-aligned, and an open last block
def test_decode_through_quantized_blocks_matches_dequantize_then_sdpa(fmt, context_len):
    gen = torch.Generator().manual_seed(context_len)
    bs, cfg = 16, SMOLLM2_135M
    layer, backend, table, k, v, tail = write_context(fmt, cfg, bs, context_len, gen)
    full = context_len // bs * bs  # tokens in full (quantized) blocks
    keys, values = backend.read_blocks(layer, table, torch.float32)  # (Hk, n, bs, D)
    keys = keys.reshape(cfg.num_kv_heads, -1, cfg.head_dim)[:, :full]
    values = values.reshape(cfg.num_kv_heads, -1, cfg.head_dim)[:, :full]
    # the open block's tokens are read exactly as computed (KIVI's residual)
    keys = torch.cat([keys, k[full:].transpose(0, 1)], dim=1)
    values = torch.cat([values, v[full:].transpose(0, 1)], dim=1)
    q = torch.randn(1, cfg.num_heads, cfg.head_dim, generator=gen)
    want = F.scaled_dot_product_attention(q[:, :, None], keys[None], values[None],
                                          scale=cfg.head_dim**-0.5, enable_gqa=True)[:, :, 0]
    got = backend.decode(q, layer, decode_meta(table, context_len, tail))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    exact = F.scaled_dot_product_attention(
        q[:, :, None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        scale=cfg.head_dim**-0.5, enable_gqa=True)[:, :, 0]
    bound = {"fp8": 0.1, "int8": 0.02, "int4": 0.3}[fmt]  # quantization error, not a bug
    assert (got - exact).abs().max() < bound
    if cpu_kernel.available():
        kernel = cpu_kernel.paged_decode_quantized(
            q, layer, table[None], torch.tensor([context_len]), torch.tensor([tail]),
            cfg.head_dim**-0.5)
        torch.testing.assert_close(kernel, got, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block_size", [16, 128])
def test_page_size_counts_every_byte_allocated(fmt, block_size):
    cache = PagedKVCache.for_model(SMOLLM2_135M, 10, block_size, fmt)
    assert cache.allocated_bytes == 11 * cache.page_size_bytes  # + the null page
    assert cache.residual_bytes > 0  # the residual is reported beside the pool, not in it


def test_a_byte_budget_buys_blocks_at_their_real_size():
    budget = 2**30
    configs = {kv: RunConfig(kv_dtype=kv, kv_budget_bytes=budget, block_size=128,
                             max_model_len=1024) for kv in ("bf16", "fp8", "int8", "int4")}
    page = {kv: c.kv_bytes_per_block for kv, c in configs.items()}
    assert {kv: c.resolved_num_blocks for kv, c in configs.items()} == {
        kv: budget // p for kv, p in page.items()}
    assert page["bf16"] == 2 * page["fp8"]  # one scale per tensor: nothing beside the blocks
    assert page["bf16"] >= 1.9 * page["int8"] and page["bf16"] >= 3.5 * page["int4"]


def test_rotation_needs_a_quantized_cache():
    with pytest.raises(ConfigError, match="kv_rotate"):
        RunConfig(kv_dtype="bf16", kv_rotate=True)
    assert RunConfig(kv_dtype="int4", kv_rotate=True).kv_groups()[0].spec.rotate


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_runs_end_to_end_with_prefix_hits_and_preemption(tiny_model, fmt):
    shared = list(range(1000, 1040))
    requests = [WorkloadRequest(i, prompt_token_ids=shared + [i] * (3 + 2 * i), max_tokens=24,
                                arrival=0.0 if i == 0 else 0.01) for i in range(8)]
    config = RunConfig(model="tiny", device="cpu", kv_dtype=fmt, kv_rotate=fmt == "int4",
                       num_blocks=20, block_size=8, max_model_len=128, max_num_seqs=6,
                       keyframe_interval=1, sampling=SamplingConfig(ignore_eos=True))
    sink = ListSink()
    result = run(config, sink, model=tiny_model, requests=requests)
    assert result.summary.num_finished == 8
    assert result.summary.num_preemptions > 0 and result.summary.prefix_hit_rate > 0
    assert result.summary.kv_dtype == fmt
    assert all(len(t) == 24 for t in result.output_token_ids.values())
    assert_events_rebuild_keyframes(sink)  # replay works unchanged on quantized blocks


def test_a_bf16_cache_under_fp32_weights_runs(tiny_model):
    config = RunConfig(model="tiny", device="cpu", kv_dtype="bf16", num_blocks=32,
                       max_model_len=128, sampling=SamplingConfig(ignore_eos=True))
    requests = [WorkloadRequest(i, prompt_token_ids=[5 + i] * 40, max_tokens=8) for i in range(3)]
    result = run(config, ListSink(), model=tiny_model, requests=requests)
    assert result.summary.num_finished == 3 and result.summary.kv_bytes_per_token == 256


def test_the_quality_harness_scores_fp32_against_itself_exactly(tiny_model):
    passages = passage_tokens(held_set(2), tiny_model.tokenizer, 96)
    config = RunConfig(model="tiny", device="cpu", max_model_len=97)
    same = evaluate(config, tiny_model, passages, context=96, num_scored=20)
    assert same.kl_mean == 0.0 and same.top1 == 1.0 and same.ppl == same.ppl_ref
    assert same.num_tokens_scored == 40
    int4 = evaluate(config.replace(kv_dtype="int4"), tiny_model, passages, context=96,
                    num_scored=20)
    assert int4.kl_mean > 0 and int4.kv_bytes_per_token < same.kv_bytes_per_token / 3


def test_cli_quality_scores_fp32_weights_by_default(capsys):
    """The run default may be bf16 on this CPU; quality keeps fp32 weights unless told, so its
    figures are the cache's cost alone (an fp32 cache then scores exactly 0)."""
    import json

    import cli

    assert cli.build_parser().parse_args(["quality"]).dtype == "fp32"
    code = cli.main(["quality", "--model", "tiny", "--kv-dtype", "fp32", "--context", "64",
                     "--num-scored", "8", "--passages", "1", "--json", "--no-store"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and figures["kl_mean"] == 0.0 and figures["top1"] == 1.0


@pytest.mark.slow
def test_smollm2_int8_and_int4_stay_close_to_fp32(smollm2):
    passages = passage_tokens(held_set(2), smollm2.tokenizer, 256)
    config = RunConfig(model="smollm2", device="cpu", max_model_len=257)
    int8 = evaluate(config.replace(kv_dtype="int8"), smollm2, passages, context=256,
                    num_scored=32)
    int4 = evaluate(config.replace(kv_dtype="int4"), smollm2, passages, context=256,
                    num_scored=32)
    assert int8.kl_mean < 0.01 and int8.top1 > 0.95
    assert int8.kl_mean < int4.kl_mean < 0.5
