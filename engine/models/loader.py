"""Build a ready-to-run model: weights, tokenizer, config, device and dtype together.

A model is a preset name (engine.models.config.MODEL_CONFIGS: the bundled SmolLM2, or a random
model by seed) or a Hugging Face model folder (hf_loader.py: Llama or DeepSeek-V2/V3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.host_memory import pack_parameters
from engine.models.config import MODEL_CONFIGS, LlamaConfig, ModelConfig
from engine.models.deepseek import DeepseekV2
from engine.models.hf_config import ModelFolderError, looks_like_path
from engine.models.llama import Llama
from engine.models.mla_config import MLAConfig
from engine.tokenizer import Tokenizer, load_tokenizer

Model = Llama | DeepseekV2
# kept in fp32 whatever the weights' dtype: the MoE router (transformers does the same)
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


@dataclass
class LoadedModel:
    model: Model
    tokenizer: Tokenizer
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype


def random_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights (same seed -> same weights on every machine): norms are ones,
    everything else N(0, 0.02), drawn on the CPU in state-dict order."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(p.shape)
        else:
            sd[name] = torch.randn(p.shape, generator=gen) * 0.02
    return sd


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor],
                device: torch.device, dtype: torch.dtype) -> Model:
    """The model for `config` with `state_dict` cast to dtype on device, without a wasted
    random init."""
    with torch.device("meta"):
        model = DeepseekV2(config) if isinstance(config, MLAConfig) else Llama(config)
    sd = {name: t.to(device=device, dtype=torch.float32 if name.endswith(FP32_SUFFIXES)
                     else dtype) for name, t in state_dict.items()}
    model.load_state_dict(sd, assign=True, strict=True)
    del sd
    model.reset_rope(device)
    model.eval().requires_grad_(False)
    if device.type == "cpu":  # decode streams every weight each step: huge pages read faster
        pack_parameters(model)
    return model


def build_llama(config: LlamaConfig, state_dict: dict[str, torch.Tensor],
                device: torch.device, dtype: torch.dtype) -> Llama:
    """Llama with `state_dict` cast to dtype on device, without a wasted random init."""
    return build_model(config, state_dict, device, dtype)


def load_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0
               ) -> LoadedModel:
    """'smollm2': the real SmolLM2-135M-Instruct weights; 'tiny', 'mla-lite', 'mla-tiny':
    seeded random weights (SmolLM2's tokenizer); a folder path: that checkpoint."""
    device = torch.device(device)
    if looks_like_path(name):
        from engine.models.hf_loader import folder_state_dict, folder_tokenizer

        config, state_dict = folder_state_dict(name)
        tokenizer = folder_tokenizer(name, config)  # before the weights: fail fast
        try:
            model = build_model(config, state_dict, device, dtype)
        except RuntimeError as exc:  # load_state_dict: shapes that config.json contradicts
            detail = str(exc).splitlines()[-1].strip()
            raise ModelFolderError(f"model folder {name}: the weights do not match its "
                                   f"config.json ({detail})") from exc
        return LoadedModel(model, tokenizer, config, device, dtype)
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)} or "
                         "give a model folder")
    config = MODEL_CONFIGS[name]
    if name == "smollm2":
        from engine.models.gguf_loader import load_smollm2_state_dict

        state_dict = load_smollm2_state_dict(config)
    else:
        with torch.device("meta"):
            shapes = DeepseekV2(config) if isinstance(config, MLAConfig) else Llama(config)
        state_dict = random_state_dict(shapes, seed)
    model = build_model(config, state_dict, device, dtype)
    return LoadedModel(model, load_tokenizer(), config, device, dtype)
