"""`cli.py convert-mla`: SmolLM2 as MLA. At full rank with every RoPE dim the converted model
computes SmolLM2's logits; below that it runs and costs quality (measured by cli.py quality)."""

from __future__ import annotations

import json

import pytest
import torch

import cli
from engine.kv_cache.storage import PagedKVCache
from engine.model_runner import ModelRunner
from engine.models.loader import load_model
from engine.models.mla_config import MLAConfig
from engine.models.mla_convert import convert
from engine.sequence import Sequence


def prompt_logits(loaded, ids: list[int], mla_path: str = "auto") -> torch.Tensor:
    """Logits after a prefill of ids[:-1] and one decode step of ids[-1] -> (2, V)."""
    blocks = -(-len(ids) // 16)
    cache = PagedKVCache.for_model(loaded.config, blocks, 16, "fp32", loaded.device)
    runner = ModelRunner(loaded, cache, mla_path)
    seq = Sequence(0, list(ids), len(ids) - 1, 4, block_tables=(list(range(blocks)),))
    seq.token_ids = seq.token_ids[:-1]
    first = runner.execute([(seq, len(ids) - 1)])
    seq.num_computed_tokens = len(ids) - 1
    seq.token_ids.append(ids[-1])
    return torch.cat([first, runner.execute([(seq, 1)])])


@pytest.mark.slow
def test_full_rank_with_all_rope_dims_reproduces_smollm2(smollm2, tmp_path):
    with torch.inference_mode():
        report = convert(smollm2, rank=192, rope_dims=64, out=tmp_path, calibration_tokens=256)
    assert report.kv_values_per_token_per_layer == 192 + 3 * 64 == 384  # = GQA's 2 x 3 x 64
    mla = load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    assert isinstance(mla.config, MLAConfig) and mla.config.converted_from == "smollm2"
    ids = smollm2.tokenizer.encode("The cache of a transformer holds keys and values " * 6)
    ref = prompt_logits(smollm2, ids)
    for path in ("absorbed", "expanded"):
        out = prompt_logits(mla, ids, path)
        assert (out - ref).abs().max().item() < 1e-3, path  # fp32 reassociation: ~2e-5
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_low_rank_runs_and_reports_its_bytes(tmp_path, capsys):
    out = tmp_path / "r32"
    assert cli.main(["convert-mla", "--rank", "32", "--rope-dims", "16", "--out", str(out),
                     "--calibration-tokens", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv_values_per_token_per_layer"] == 32 + 48
    assert report["kv_bytes_per_token"] == 80 * 30 * 4
    assert report["gqa_kv_bytes_per_token"] == 384 * 30 * 4
    config = json.loads((out / "config.json").read_text())
    assert len(config["kvlab_rope_frequency_indices"]) == 30
    assert all(len(h) == 8 for layer in config["kvlab_rope_frequency_indices"] for h in layer)
    assert cli.main(["generate", "--model", str(out), "--prompt", "Hello", "--max-tokens", "3",
                     "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) <= 3


def test_convert_rejects_bad_ranks(capsys):
    assert cli.main(["convert-mla", "--rank", "400", "--rope-dims", "16"]) == 2
    assert "336 is lossless" in capsys.readouterr().err
    assert cli.main(["convert-mla", "--rank", "64", "--rope-dims", "7"]) == 2
    assert "even" in capsys.readouterr().err
