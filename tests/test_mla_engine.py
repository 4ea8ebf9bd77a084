"""MLA models through the whole engine: prefix caching, preemption and eviction, quantized
latents, the trace store, and the command line (run --json, generate --json, model folders).

The model is a tiny random DeepSeek-V2 with MoE layers, written by transformers as a folder
(its weights are drawn large enough that greedy outputs differ between requests, which the
seeded presets' N(0, 0.02) weights do not)."""

from __future__ import annotations

import json

import pytest
import torch

import cli
from engine.config import ConfigError, RunConfig, SamplingConfig
from engine.models.loader import load_model
from engine.run import run
from engine.trace import ListSink
from engine.workload import WorkloadRequest
from tests.mla_oracle import MOE, make_deepseek

GREEDY_FIXED = SamplingConfig(ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek-moe")
    make_deepseek(path, MOE, seed=3)
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(str(folder), torch.device("cpu"), torch.float32)


def serve(loaded, requests, **knobs):
    knobs.setdefault("sampling", GREEDY_FIXED)
    knobs.setdefault("max_model_len", 256)
    config = RunConfig(model=loaded.config.name, device="cpu", **knobs)
    sink = ListSink()
    return run(config, sink, model=loaded, requests=requests), sink


def shared_prefix_requests(n=6, prefix=48, max_tokens=12):
    system = [(7 * i) % 49000 + 100 for i in range(prefix)]
    return [WorkloadRequest(i, prompt_token_ids=system + [200 + i, 300 + 3 * i, 400 + i],
                            max_tokens=max_tokens, arrival=0.0 if i == 0 else 0.05)
            for i in range(n)]


def test_prefix_cache_hits_give_the_same_outputs(loaded):
    requests = shared_prefix_requests()
    on, sink = serve(loaded, requests, block_size=16)
    off, _ = serve(loaded, requests, block_size=16, enable_prefix_caching=False)
    assert sum(s.prefix_hit_tokens for s in sink.steps) == 5 * 48
    assert on.output_token_ids == off.output_token_ids
    assert len({tuple(v) for v in on.output_token_ids.values()}) > 1, "degenerate outputs"


@pytest.mark.parametrize("mla_path", ["absorbed", "expanded"])
def test_preemption_and_eviction_keep_greedy_outputs(loaded, mla_path):
    requests = [WorkloadRequest(i, prompt_token_ids=list(range(100 + 9 * i, 140 + 9 * i)),
                                max_tokens=20) for i in range(4)]
    roomy, _ = serve(loaded, requests, num_blocks=128, max_model_len=64, mla_path=mla_path)
    tight, sink = serve(loaded, requests, num_blocks=6, max_model_len=64, mla_path=mla_path)
    assert tight.summary.num_finished == 4
    assert tight.summary.num_preemptions > 0
    assert any(e.kind == "evict" for e in sink.block_events)
    assert tight.output_token_ids == roomy.output_token_ids


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8", "int8"])
def test_latent_formats_run_and_mostly_agree_with_fp32(loaded, kv_dtype):
    requests = shared_prefix_requests(n=4, max_tokens=8)
    ref, _ = serve(loaded, requests, block_size=16)
    out, _ = serve(loaded, requests, block_size=16, kv_dtype=kv_dtype)
    entry = loaded.config.kv_lora_rank + loaded.config.qk_rope_head_dim  # 32 + 8
    per_layer = {"bf16": 2 * entry, "fp8": 32 + 4 + 2 * 8, "int8": 32 + 4 + 2 * 8}[kv_dtype]
    assert out.summary.kv_bytes_per_token == per_layer * loaded.config.num_layers
    assert out.summary.kv_allocated_bytes_per_token == out.summary.kv_bytes_per_token
    first = [out.output_token_ids[i][0] == ref.output_token_ids[i][0] for i in range(4)]
    assert sum(first) >= 3


def test_a_run_is_stored_and_read_back(loaded, store):
    from store import RunReader, RunWriter

    config = RunConfig(model=loaded.config.name, device="cpu", max_model_len=256,
                       keyframe_interval=3, sampling=GREEDY_FIXED)
    writer = RunWriter(store, config, name="mla")
    result = run(config, writer, model=loaded, requests=shared_prefix_requests(n=3))
    writer.close(summary=result.summary)
    reader = RunReader(store)
    runs = reader.list_runs()
    assert runs["model"].tolist() == [str(loaded.config.name)]
    steps = reader.steps(int(runs["run_id"].iloc[0]))
    assert len(steps) == result.summary.steps
    assert steps["kv_bytes_used"].max() > 0


def test_cli_run_json_reports_the_latent_bytes(tmp_path, capsys):
    workload = tmp_path / "w.jsonl"
    workload.write_text("\n".join(json.dumps({"prompt": f"Hello number {i}", "max_tokens": 2})
                                  for i in range(2)))
    code = cli.main(["run", "--model", "mla-lite", "--workload", str(workload), "--json",
                     "--num-blocks", "32", "--max-model-len", "64", "--kv-dtype", "bf16"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kv_bytes_per_token"] == (512 + 64) * 4 * 2
    assert summary["kv_allocated_bytes_per_token"] == (512 + 64) * 4 * 2
    assert summary["num_finished"] == 2


def test_cli_generate_json_from_a_folder(folder, capsys):
    code = cli.main(["generate", "--model", str(folder), "--prompt", "Hi there",
                     "--max-tokens", "4", "--json", "--mla-path", "expanded"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) <= 4 and isinstance(out["text"], str)


def test_bad_model_folders_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig(model=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no config.json"):
        RunConfig(model=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="not supported"):
        RunConfig(model=str(tmp_path))
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ConfigError, match="fp8 checkpoints are not supported"):
        RunConfig(model=str(tmp_path))


def test_vocab_mismatch_without_a_tokenizer_is_an_error(tmp_path, capsys):
    from tests.mla_oracle import DENSE

    folder = tmp_path / "m"
    make_deepseek(folder, {**DENSE, "num_hidden_layers": 1})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 50000
    (folder / "config.json").write_text(json.dumps(config))
    assert cli.main(["generate", "--model", str(folder), "--prompt", "x"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
