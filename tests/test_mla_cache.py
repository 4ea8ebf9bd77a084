"""The latent cache: its spec, the bytes really allocated, and its formats against fp32."""

from __future__ import annotations

import pytest
import torch

from engine.attention import mla_paged
from engine.attention.mla import MLAAttention, cheaper_path, mla_backend
from engine.attention.mla_paged import LatentProjections
from engine.attention.mla_quantized import dequantize_latent, quantize_latent
from engine.config import ConfigError, RunConfig
from engine.kv_cache.spec import latent_attention_spec
from engine.kv_cache.storage import PagedKVCache
from engine.models.config import MODEL_CONFIGS
from engine.models.mla_config import MLA_LITE
from engine.models.mla_shapes import SHAPES


@pytest.mark.parametrize(("kv_dtype", "size"), [("fp32", 4), ("bf16", 2), ("fp16", 2)])
def test_allocated_bytes_per_token_are_latent_plus_rope_times_layers(kv_dtype, size):
    cache = PagedKVCache.for_model(MLA_LITE, 40, 16, kv_dtype, "cpu")
    expected = (MLA_LITE.kv_lora_rank + MLA_LITE.qk_rope_head_dim) * MLA_LITE.num_layers * size
    assert expected == 576 * 4 * size
    assert cache.allocated_bytes_per_token == expected  # measured from the tensors
    assert cache.allocated_bytes == 41 * 16 * expected  # 40 blocks + the null page
    assert set(cache.storage) == {"latent"}  # one tensor: no K/V pair
    assert cache.storage["latent"].shape == (4, 1, 41, 16, 576)


@pytest.mark.parametrize("kv_dtype", ["fp8", "int8"])
def test_quantized_latent_is_flashmla_656_bytes(kv_dtype):
    spec = latent_attention_spec(512, 64, 16, kv_dtype)
    assert spec.bytes_per_token == 512 + 4 * 4 + 64 * 2 == 656
    assert not spec.uses_residual  # per-token quantization at write time
    cache = PagedKVCache.for_model(MLA_LITE, 8, 16, kv_dtype, "cpu")
    assert cache.residual is None
    assert cache.allocated_bytes_per_token == 656 * MLA_LITE.num_layers


def test_spec_errors_name_the_fix():
    with pytest.raises(ValueError, match="int4"):
        latent_attention_spec(512, 64, 16, "int4")
    with pytest.raises(ValueError, match="rotation"):
        latent_attention_spec(512, 64, 16, "int8", rotate=True)
    with pytest.raises(ValueError, match="divisible by 16"):
        latent_attention_spec(100, 48, 16, "fp8")
    with pytest.raises(ConfigError, match="kv_dtype"):
        RunConfig(model="mla-tiny", kv_dtype="int4", max_model_len=64)
    with pytest.raises(ConfigError, match="policy"):
        RunConfig(model="mla-tiny", policy="0-1/h0:full; 0-1/h1:full", max_model_len=64)


def test_run_config_sizes_mla_presets_from_the_spec():
    config = RunConfig(model="mla-lite", kv_dtype="bf16", max_model_len=1024)
    assert config.kv_bytes_per_block == 576 * 2 * 4 * 16
    assert "mla-lite" in MODEL_CONFIGS and "mla-tiny" in MODEL_CONFIGS


def test_shapes_formula_equals_allocated():
    for shape in SHAPES.values():
        for kind in ("MHA", "GQA", "MLA"):
            assert shape.measured_bytes(kind, "bf16") == shape.formula_bytes(kind, "bf16")
    v2 = SHAPES["DeepSeek-V2"]
    assert v2.elements("MLA") == 576 and v2.elements("MHA") == 2 * 128 * 128


def test_quantize_latent_round_trip():
    x = torch.randn(10, 512) * torch.linspace(0.1, 5, 512)
    for kv, tol in (("int8", 0.01), ("fp8", 0.07)):
        values, scale = quantize_latent(x, kv, 128)
        assert scale.shape == (10, 4)
        err = (dequantize_latent(values, scale, torch.float32) - x).abs().max(dim=-1).values
        assert (err <= tol * x.abs().max(dim=-1).values).all(), kv


def projections(heads=4, nope=16, v=16, rank=32, rope_heads=1, seed=0) -> LatentProjections:
    kv_b = torch.randn(heads * (nope + v), rank, generator=torch.Generator().manual_seed(seed))
    return LatentProjections.from_kv_b(kv_b * 0.2, heads, nope, v, rope_heads)


@pytest.mark.parametrize("rope_heads", [1, 2])
def test_absorbed_equals_expanded_prefill_and_decode(rope_heads):
    """The two paths are algebraically equal, with one or several RoPE heads."""
    up, dr = projections(rope_heads=rope_heads), 8
    gen = torch.Generator().manual_seed(1)
    ctx = torch.randn(40, 32 + rope_heads * dr, generator=gen)
    q = torch.randn(6, 4, 16 + dr, generator=gen)
    mask = torch.ones(6, 40, dtype=torch.bool).tril(34)
    a = mla_paged.prefill_absorbed(q, ctx, up, mask, 0.2)
    e = mla_paged.prefill_expanded(q, ctx, up, mask, 0.2)
    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    bias = torch.zeros(6, 1, 40)
    bias[:, :, 37:] = float("-inf")
    ctx_b = ctx.expand(6, 40, -1)
    lat = mla_paged.decode_absorbed(mla_paged.absorb_query(q, up, 0.2), ctx_b, bias, 32)
    dec_a = mla_paged.absorb_output(lat.transpose(0, 1), up)
    dec_e = mla_paged.decode_expanded(q, ctx_b, bias, up, 0.2)
    torch.testing.assert_close(dec_a, dec_e, rtol=1e-5, atol=1e-5)


def test_path_rule():
    up = projections(heads=16, nope=128, v=128, rank=512)
    assert cheaper_path(1, 4096, up, 64) == "absorbed"  # decode
    assert cheaper_path(512, 512, up, 64) == "expanded"  # a whole prompt
    assert cheaper_path(64, 8192, up, 64) == "absorbed"  # a short chunk on a long prefix
    assert cheaper_path(512, 8192, up, 64) == "expanded"
    spec = latent_attention_spec(512, 64, 16, "fp8")
    assert type(mla_backend(spec, 0.1, None)).__name__ == "QuantizedMLAAttention"
    with pytest.raises(ValueError, match="path"):
        MLAAttention(spec, 0.1, None, path="fast")
