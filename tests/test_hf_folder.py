"""Llama model folders (config.json + safetensors) through our loader equal transformers, and
a folder's own tokenizer is used when it has one."""

from __future__ import annotations

import json

import torch

import cli
from engine.config import RunConfig
from engine.kv_cache.storage import PagedKVCache
from engine.model_runner import ModelRunner
from engine.models.config import LlamaConfig
from engine.models.loader import load_model
from engine.sequence import Sequence
from engine.tokenizer import load_tokenizer


def make_llama(folder, vocab=49152, seed=0):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    config = HFLlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, tie_word_embeddings=True,
                           attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(folder)
    return model


def test_llama_folder_matches_transformers(tmp_path):
    hf = make_llama(tmp_path)
    loaded = load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    assert isinstance(loaded.config, LlamaConfig) and loaded.config.num_kv_heads == 2
    ids = [(37 * i) % 49152 for i in range(40)]
    cache = PagedKVCache.for_model(loaded.config, 4, 16, "fp32", loaded.device)
    seq = Sequence(0, ids, len(ids), 1, block_tables=([2, 0, 3],))
    ours = ModelRunner(loaded, cache).execute([(seq, len(ids))])[0]
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0, -1]
    assert (ours - theirs).abs().max().item() < 5e-5
    config = RunConfig(model=str(tmp_path), max_model_len=128)
    assert config.model == str(tmp_path.resolve()) and config.model_config.num_layers == 2


def test_the_folders_own_tokenizer_is_used(tmp_path, capsys):
    make_llama(tmp_path)
    bundled = load_tokenizer()
    (tmp_path / "tokenizer.json").write_text(bundled.backend.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": bundled.chat_template}))
    loaded = load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    assert loaded.tokenizer is not bundled
    assert loaded.tokenizer.eos_token_id == bundled.eos_token_id
    assert loaded.tokenizer.encode("a KV cache") == bundled.encode("a KV cache")
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "Hi", "--chat",
                     "--max-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) <= 3


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, capsys):
    make_llama(tmp_path, vocab=1000)
    (tmp_path / "tokenizer.json").write_text(load_tokenizer().backend.to_str())
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "Hi"]) == 2
    assert "more than the model's vocab_size 1000" in capsys.readouterr().err
