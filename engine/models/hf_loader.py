"""Weights and tokenizer of a Hugging Face model folder (config.json + *.safetensors).

Names are mapped onto ours (llama.py, deepseek.py) with the same fusions the GGUF loader
makes: q/k/v and gate/up into one Linear each for Llama; for DeepSeek the query projection
(or its LoRA down-projection) with `kv_a_proj_with_mqa` into `in_proj`, gate/up into one,
and the routed experts stacked `(E, 2I, C)` / `(E, C, I)`. Extra tensors of layers past
`num_hidden_layers` (DeepSeek-V3's multi-token-prediction layer) are ignored; a tensor we need
but do not find is an error naming it.

Tokenizer: the folder's own `tokenizer.json` when there is one (its vocabulary may be smaller
than the model's, never larger), else the bundled SmolLM2 tokenizer, which then must have
exactly the model's vocabulary size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.models.config import LlamaConfig, ModelConfig
from engine.models.hf_config import ModelFolderError, read_folder_config
from engine.models.mla_config import MLAConfig
from engine.tokenizer import Tokenizer, load_tokenizer

PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, `model.` prefixes dropped."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFolderError(f"model folder {folder} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return {name.removeprefix("model."): t for name, t in tensors.items()}


class _Weights:
    """Named lookups that fail with the name of what is missing."""

    def __init__(self, folder: Path, tensors: dict[str, torch.Tensor]):
        self.folder, self.tensors = folder, tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ModelFolderError(f"model folder {self.folder} lacks weight {name!r}; is it a "
                                   "complete checkpoint of the architecture config.json names?")
        return self.tensors[name]

    def cat(self, *names: str) -> torch.Tensor:
        return torch.cat([self[n] for n in names])


def _outer(w: _Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors outside the layers: embeddings, final norm, an untied LM head."""
    sd = {"embed_tokens.weight": w["embed_tokens.weight"], "norm.weight": w["norm.weight"]}
    if not config.tie_word_embeddings:
        sd["lm_head.weight"] = w["lm_head.weight"]
    return sd


def llama_state_dict(w: _Weights, config: LlamaConfig) -> dict[str, torch.Tensor]:
    sd = _outer(w, config)
    for i in range(config.num_layers):
        g, p = f"layers.{i}.", f"layers.{i}."
        sd[p + "attn_norm.weight"] = w[g + "input_layernorm.weight"]
        sd[p + "attn.qkv_proj.weight"] = w.cat(*(g + f"self_attn.{x}_proj.weight" for x in "qkv"))
        sd[p + "attn.o_proj.weight"] = w[g + "self_attn.o_proj.weight"]
        sd[p + "mlp_norm.weight"] = w[g + "post_attention_layernorm.weight"]
        _mlp(w, g + "mlp.", p + "mlp.", sd)
    return sd


def _mlp(w: _Weights, src: str, dst: str, sd: dict[str, torch.Tensor]) -> None:
    sd[dst + "gate_up_proj.weight"] = w.cat(src + "gate_proj.weight", src + "up_proj.weight")
    sd[dst + "down_proj.weight"] = w[src + "down_proj.weight"]


def _experts(w: _Weights, src: str, config: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed experts, stacked (from per-expert tensors, or transformers 5's fused ones)."""
    if src + "experts.gate_up_proj" in w.tensors:
        return w[src + "experts.gate_up_proj"], w[src + "experts.down_proj"]
    e = range(config.n_routed_experts)
    gate_up = torch.stack([w.cat(f"{src}experts.{j}.gate_proj.weight",
                                 f"{src}experts.{j}.up_proj.weight") for j in e])
    down = torch.stack([w[f"{src}experts.{j}.down_proj.weight"] for j in e])
    return gate_up, down  # (E, 2I, C), (E, C, I)


def deepseek_state_dict(w: _Weights, config: MLAConfig) -> dict[str, torch.Tensor]:
    sd = _outer(w, config)
    for i in range(config.num_layers):
        g, p = f"layers.{i}.", f"layers.{i}."
        a, q = g + "self_attn.", p + "attn."
        sd[p + "attn_norm.weight"] = w[g + "input_layernorm.weight"]
        sd[p + "mlp_norm.weight"] = w[g + "post_attention_layernorm.weight"]
        q_in = a + ("q_a_proj.weight" if config.q_lora_rank else "q_proj.weight")
        sd[q + "in_proj.weight"] = w.cat(q_in, a + "kv_a_proj_with_mqa.weight")
        if config.q_lora_rank:
            sd[q + "q_a_layernorm.weight"] = w[a + "q_a_layernorm.weight"]
            sd[q + "q_b_proj.weight"] = w[a + "q_b_proj.weight"]
        if config.kv_latent_norm:
            sd[q + "kv_a_layernorm.weight"] = w[a + "kv_a_layernorm.weight"]
        sd[q + "kv_b_proj.weight"] = w[a + "kv_b_proj.weight"]
        sd[q + "o_proj.weight"] = w[a + "o_proj.weight"]
        if not config.is_moe_layer(i):
            _mlp(w, g + "mlp.", p + "mlp.", sd)
            continue
        sd[p + "mlp.gate.weight"] = w[g + "mlp.gate.weight"]
        if config.topk_method == "noaux_tc":
            sd[p + "mlp.gate.e_score_correction_bias"] = w[g + "mlp.gate.e_score_correction_bias"]
        sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"] = _experts(
            w, g + "mlp.", config)
        if config.n_shared_experts:
            _mlp(w, g + "mlp.shared_experts.", p + "mlp.shared_experts.", sd)
    return sd


def folder_state_dict(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The folder's config and our state dict (the checkpoint's dtype, on the CPU)."""
    path = Path(folder).expanduser()
    config = read_folder_config(path)
    weights = _Weights(path, read_safetensors(path))
    if isinstance(config, MLAConfig):
        return config, deepseek_state_dict(weights, config)
    return config, llama_state_dict(weights, config)


def _token_id(value: object, backend) -> int | None:
    """An id from config/tokenizer_config values: an int, a list, a string, {"content": s}."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        return backend.token_to_id(value)
    return value if isinstance(value, int) else None


def folder_tokenizer(folder: str | Path, config: ModelConfig) -> Tokenizer:
    """The folder's tokenizer, or the bundled one (see the module docstring)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(folder).expanduser()
    if not (path / "tokenizer.json").is_file():
        bundled = load_tokenizer()
        if bundled.vocab_size != config.vocab_size:
            raise ModelFolderError(
                f"model folder {folder} has no tokenizer.json and its vocab_size "
                f"({config.vocab_size}) differs from the bundled SmolLM2 tokenizer's "
                f"({bundled.vocab_size}); add the model's tokenizer.json to the folder")
        return bundled
    backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
    if backend.get_vocab_size() > config.vocab_size:
        raise ModelFolderError(f"{folder}/tokenizer.json has {backend.get_vocab_size()} tokens, "
                               f"more than the model's vocab_size {config.vocab_size}")
    extra = {}
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        if (path / name).is_file():
            extra = {**json.loads((path / name).read_text(encoding="utf-8")), **extra}
    template = extra.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    eos = _token_id(extra.get("eos_token_id", extra.get("eos_token")), backend)
    bos = _token_id(extra.get("bos_token_id", extra.get("bos_token")), backend)
    specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
    return Tokenizer(backend, template or PLAIN_TEMPLATE, -1 if eos is None else eos,
                     -1 if bos is None else bos, specials)
