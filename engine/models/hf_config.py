"""A model folder's config.json (Hugging Face format) read into our config classes.

Torch-free, so a RunConfig naming a folder is validated before any weights load. Supported:
`llama` (LlamaForCausalLM: SmolLM2 and friends) and `deepseek_v2` / `deepseek_v3` (MLA, dense
or MoE MLPs). Both the original DeepSeek keys (`rope_theta`, `rope_scaling`) and transformers
5's (`rope_parameters`) are read. Keys prefixed `kvlab_` are ours: a folder written by
`cli.py convert-mla` sets them (see mla_config.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from engine.models.config import LlamaConfig, ModelConfig
from engine.models.mla_config import MLAConfig, YarnScaling

SUPPORTED_TYPES = ("llama", "deepseek_v2", "deepseek_v3")


class ModelFolderError(ValueError):
    """A model folder that cannot be used; the message names the problem and the fix."""


def looks_like_path(model: str) -> bool:
    """A model name with a path separator or a leading dot or tilde is a folder, not a preset."""
    return "/" in model or "\\" in model or model.startswith((".", "~"))


def read_folder_config(folder: str | Path) -> ModelConfig:
    """The folder's config, or a ModelFolderError. Cached per folder and config.json version."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist; give a folder with "
                               "config.json and *.safetensors, or a preset name")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"model folder {folder} has no config.json; give a Hugging Face "
                               "model folder (config.json and *.safetensors)")
    return _read(str(path.resolve()), config_file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read(folder: str, _mtime_ns: int) -> ModelConfig:
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{folder}/config.json cannot be read as JSON ({exc})") from exc
    kind = data.get("model_type")
    if kind not in SUPPORTED_TYPES:
        raise ModelFolderError(f"{folder}: model_type {kind!r} is not supported; this lab runs "
                               f"{SUPPORTED_TYPES} checkpoints")
    if data.get("quantization_config"):
        method = data["quantization_config"].get("quant_method", "quantized")
        raise ModelFolderError(f"{folder}: {method} checkpoints are not supported (their "
                               "weights need scales this loader does not apply); use a bf16 "
                               "or fp32 checkpoint")
    for key in ("attention_bias", "mlp_bias"):
        if data.get(key):
            raise ModelFolderError(f"{folder}: {key} = true is not supported (no biases here)")
    if data.get("hidden_act", "silu") != "silu":
        raise ModelFolderError(f"{folder}: hidden_act {data['hidden_act']!r} is not supported "
                               "(only silu)")
    try:
        return _llama(folder, data) if kind == "llama" else _deepseek(folder, data, kind)
    except KeyError as exc:
        raise ModelFolderError(f"{folder}/config.json lacks {exc.args[0]!r}") from exc


def _rope(data: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling parameters or None) from either generation of keys."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or params
    theta = float(data.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return theta, (None if kind == "default" else {**scaling, "rope_type": kind})


def _llama(folder: str, data: dict[str, Any]) -> LlamaConfig:
    theta, scaling = _rope(data)
    if scaling is not None:
        raise ModelFolderError(f"{folder}: RoPE scaling {scaling['rope_type']!r} is not "
                               "supported for Llama folders")
    heads = data["num_attention_heads"]
    return LlamaConfig(
        name=folder, num_layers=data["num_hidden_layers"], hidden_size=data["hidden_size"],
        intermediate_size=data["intermediate_size"], num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or data["hidden_size"] // heads,
        vocab_size=data["vocab_size"], max_position_embeddings=data["max_position_embeddings"],
        rope_theta=theta, rms_norm_eps=data["rms_norm_eps"],
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)))


def _yarn(folder: str, scaling: dict[str, Any] | None, max_positions: int
          ) -> YarnScaling | None:
    if scaling is None:
        return None
    if scaling["rope_type"] != "yarn":
        raise ModelFolderError(f"{folder}: RoPE scaling {scaling['rope_type']!r} is not "
                               "supported for DeepSeek folders (only yarn)")
    return YarnScaling(
        factor=float(scaling["factor"]),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings")
                                             or max_positions),
        beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(
            scaling.get("beta_slow") or 1),
        mscale=float(scaling.get("mscale") or 1.0),
        mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
        attention_factor=scaling.get("attention_factor"))


def _deepseek(folder: str, data: dict[str, Any], kind: str) -> MLAConfig:
    theta, scaling = _rope(data)
    v3 = kind == "deepseek_v3"
    indices = data.get("kvlab_rope_frequency_indices")
    return MLAConfig(
        name=folder, num_layers=data["num_hidden_layers"], hidden_size=data["hidden_size"],
        intermediate_size=data["intermediate_size"], num_heads=data["num_attention_heads"],
        vocab_size=data["vocab_size"], max_position_embeddings=data["max_position_embeddings"],
        rope_theta=theta, rms_norm_eps=data["rms_norm_eps"],
        kv_lora_rank=data["kv_lora_rank"], q_lora_rank=data.get("q_lora_rank"),
        qk_nope_head_dim=data["qk_nope_head_dim"], qk_rope_head_dim=data["qk_rope_head_dim"],
        v_head_dim=data["v_head_dim"],
        num_rope_heads=int(data.get("kvlab_num_rope_heads", 1)),
        kv_latent_norm=bool(data.get("kvlab_kv_latent_norm", True)),
        rope_interleave=bool(data.get("rope_interleave", True)) if v3 else True,
        rope_scaling=_yarn(folder, scaling, data["max_position_embeddings"]),
        rope_base_dim=int(data.get("kvlab_rope_base_dim", 0)),
        rope_frequency_indices=(None if indices is None else
                                tuple(tuple(tuple(h) for h in layer) for layer in indices)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        n_routed_experts=data.get("n_routed_experts") or 0,
        num_experts_per_tok=data.get("num_experts_per_tok") or 0,
        n_shared_experts=data.get("n_shared_experts") or 0,
        moe_intermediate_size=data.get("moe_intermediate_size") or 0,
        first_k_dense_replace=data.get("first_k_dense_replace", 0),
        moe_layer_freq=data.get("moe_layer_freq", 1),
        scoring_func="sigmoid" if v3 else data.get("scoring_func", "softmax"),
        topk_method="noaux_tc" if v3 else data.get("topk_method") or "greedy",
        n_group=data.get("n_group") or 1, topk_group=data.get("topk_group") or 1,
        routed_scaling_factor=float(data.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(data.get("norm_topk_prob", v3)),
        converted_from=data.get("kvlab_converted_from"))
