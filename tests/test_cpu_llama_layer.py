"""The fused CPU bf16 decoder layers (engine/cpu/llama_layer.py): the whole decode step's layers
in one C call, and a layer in two C calls around attention, must give the op-by-op path's
logits bit for bit; steps and layers they do not serve must take that path."""

from __future__ import annotations

import pytest
import torch

from engine.config import RunConfig, SamplingConfig
from engine.cpu import linear as cpu_linear
from engine.cpu import llama_layer
from engine.model_runner import ModelRunner
from engine.models.config import TINY_LLAMA
from engine.models.llama import Llama
from engine.models.loader import LoadedModel, build_llama, load_model, random_state_dict
from engine.run import run
from engine.tokenizer import load_tokenizer
from engine.trace import ListSink
from engine.workload import WorkloadRequest

needs_kernel = pytest.mark.skipif(not cpu_linear.available(),
                                  reason="no CPU library with AVX512-BF16")

def bf16_model(config) -> LoadedModel:
    with torch.device("meta"):
        shapes = Llama(config)
    model = build_llama(config, random_state_dict(shapes, seed=3), torch.device("cpu"),
                        torch.bfloat16)
    return LoadedModel(model, load_tokenizer(), config, torch.device("cpu"), torch.bfloat16)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """A Llama folder of a shape no bundled model has: head_dim 32, 3 query heads a KV head,
    3 layers, an MLP width of 200 (a tail in every matmul over it)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("odd-llama")
    config = HFLlamaConfig(vocab_size=49152, hidden_size=192, intermediate_size=200,
                           num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                           max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(5)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(which, odd_folder) -> LoadedModel:
    if which == "tiny":
        return bf16_model(TINY_LLAMA)
    return load_model(str(odd_folder), torch.device("cpu"), torch.bfloat16)


def run_and_record(loaded, monkeypatch, kv_dtype, **knobs):
    """Greedy tokens and every step's logits of a small workload (run twice, recorded the
    second time: the first may add the memory profile's own forward pass)."""
    logits = []
    real = ModelRunner.execute

    def execute(self, batch):
        out = real(self, batch)
        logits.append(out.clone())
        return out

    monkeypatch.setattr(ModelRunner, "execute", execute)
    requests = [WorkloadRequest(i, prompt_token_ids=[100 + 7 * i + j for j in range(2 + i)],
                                max_tokens=9, arrival=0.0) for i in range(3)]
    config = RunConfig(model=loaded.config.name, device="cpu", dtype="bf16", kv_dtype=kv_dtype,
                       block_size=4, max_num_seqs=3, max_model_len=64,
                       sampling=SamplingConfig(ignore_eos=True), **knobs)
    run(config, ListSink(), model=loaded, requests=requests)
    logits.clear()
    result = run(config, ListSink(), model=loaded, requests=requests)
    monkeypatch.setattr(ModelRunner, "execute", real)
    return result.output_token_ids, logits


def spy(monkeypatch, name):
    calls = []
    real = getattr(llama_layer, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(llama_layer, name, wrapped)
    return calls


@needs_kernel
@pytest.mark.parametrize("which", ["tiny", "odd-shape"])
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp32"])
def test_fused_layers_give_the_op_by_op_logits_bit_for_bit(monkeypatch, which, kv_dtype,
                                                            odd_folder):
    loaded = load(which, odd_folder)
    stacked, per_layer = spy(monkeypatch, "decode_layers"), spy(monkeypatch, "mlp_out")
    fused_tokens, fused_logits = run_and_record(loaded, monkeypatch, kv_dtype)
    assert any(stacked), "decode-only steps should run every layer in one call"
    assert per_layer, "the prefill steps (few rows) should take the two-call layer"
    monkeypatch.setattr(llama_layer, "applies", lambda *a, **k: False)  # op by op
    plain_tokens, plain_logits = run_and_record(loaded, monkeypatch, kv_dtype)
    assert fused_tokens == plain_tokens
    assert len(fused_logits) == len(plain_logits)
    for step, (a, b) in enumerate(zip(fused_logits, plain_logits, strict=True)):
        assert torch.equal(a, b), f"step {step}"


@needs_kernel
def test_steps_it_does_not_serve_take_the_layer_path(monkeypatch):
    """An fp16 cache has no stacked kernel; a hooked norm must fire: both run layer by layer
    and still match the op-by-op logits."""
    loaded = bf16_model(TINY_LLAMA)
    monkeypatch.setattr(llama_layer, "applies", lambda *a, **k: False)
    _, plain = run_and_record(loaded, monkeypatch, "fp16")
    monkeypatch.undo()
    stacked = spy(monkeypatch, "decode_layers")
    _, fused = run_and_record(loaded, monkeypatch, "fp16")
    assert stacked and not any(stacked)  # asked, and declined: no fp16 format
    assert all(torch.equal(a, b) for a, b in zip(fused, plain, strict=True))

    seen = []
    loaded.model.layers[1].mlp_norm.register_forward_hook(lambda m, a, out: seen.append(1))
    stacked.clear()
    _, hooked = run_and_record(loaded, monkeypatch, "bf16")
    assert seen and not any(stacked)  # the hook fired on every step: no fused path bypassed it


@needs_kernel
def test_a_slot_outside_the_cache_is_refused():
    loaded = bf16_model(TINY_LLAMA)
    model, config = loaded.model, loaded.config
    x = torch.randn(1, config.hidden_size).bfloat16()
    cos = torch.ones(1, 1, config.head_dim).bfloat16()
    cache = torch.zeros(config.num_kv_heads, 5, 4, config.head_dim, dtype=torch.bfloat16)
    layers = [(lay.attn_norm.weight, lay.attn.qkv_proj.weight, lay.attn.o_proj.weight,
               lay.mlp_norm.weight, lay.mlp.gate_up_proj.weight, lay.mlp.down_proj.weight,
               cache, cache.clone()) for lay in model.layers]
    tables, lens = torch.tensor([[0]]), torch.tensor([1])
    args = (config.num_heads, config.head_dim, 1e-5)
    out = llama_layer.decode_layers(x, cos, cos * 0, layers, *args, torch.tensor([2]), tables,
                                    lens, 0.25, 4)
    assert out is not None and out.shape == x.shape and cache[:, 0, 2].abs().sum() > 0
    with pytest.raises(IndexError, match="outside the cache"):
        llama_layer.decode_layers(x, cos, cos * 0, layers, *args, torch.tensor([20]), tables,
                                  lens, 0.25, 4)
    # int32 metadata is not what the C code reads: declined, nothing written
    assert llama_layer.decode_layers(x, cos, cos * 0, layers, *args,
                                     torch.tensor([2], dtype=torch.int32), tables, lens, 0.25,
                                     4) is None
