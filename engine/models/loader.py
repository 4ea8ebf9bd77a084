"""Build a ready-to-run model: weights, tokenizer, config, device and dtype together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.config import MODEL_CONFIGS, LlamaConfig
from engine.models.llama import Llama
from engine.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    model: Llama
    tokenizer: Tokenizer
    config: LlamaConfig
    device: torch.device
    dtype: torch.dtype


def random_state_dict(model: Llama, seed: int) -> dict[str, torch.Tensor]:
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


def build_llama(config: LlamaConfig, state_dict: dict[str, torch.Tensor],
                device: torch.device, dtype: torch.dtype) -> Llama:
    """Llama with `state_dict` cast to dtype on device, without a wasted random init."""
    with torch.device("meta"):
        model = Llama(config)
    sd = {name: t.to(device=device, dtype=dtype) for name, t in state_dict.items()}
    model.load_state_dict(sd, assign=True, strict=True)
    model.reset_rope(device)
    return model.eval().requires_grad_(False)


def load_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0
               ) -> LoadedModel:
    """'smollm2': the real SmolLM2-135M-Instruct weights; 'tiny': TINY_LLAMA with seeded random
    weights. Both use SmolLM2's tokenizer."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    config = MODEL_CONFIGS[name]
    if name == "smollm2":
        from engine.models.gguf_loader import load_smollm2_state_dict

        state_dict = load_smollm2_state_dict(config)
    else:
        with torch.device("meta"):
            shapes = Llama(config)
        state_dict = random_state_dict(shapes, seed)
    model = build_llama(config, state_dict, torch.device(device), dtype)
    return LoadedModel(model, load_tokenizer(), config, torch.device(device), dtype)
