"""Llama (SmolLM2) over a paged KV cache, read top to bottom.

One engine step is one flat sequence of T tokens: the prefill chunks of several requests, then
one token per decoding request. Every Linear runs once per step over all T tokens; only
attention looks at request boundaries (through AttentionMetadata). q/k/v and gate/up are fused
(the GGUF loader concatenates their weights), which saves two Linear calls per layer.

Shapes: T tokens, H query heads, Hk KV heads, D head dim, C hidden size, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.layer import Attention
from engine.attention.metadata import AttentionMetadata
from engine.cpu import linear as cpu_linear
from engine.cpu import llama_layer as cpu_layer
from engine.cpu import norm as cpu_norm
from engine.cpu import pointwise as cpu_pointwise
from engine.kv_cache.spec import KVCacheSpec
from engine.models.config import LlamaConfig


def rope_tables(config: LlamaConfig, device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_position_embeddings, D) in fp32, HF layout: frequencies repeated per half."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)  # (P, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (P, D)
    return angles.cos().to(device), angles.sin().to(device)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (T, in) @ weight (out, in).T -> (T, out), contiguous.

    CPU bf16 at decode sizes: the lab's kernel (engine/cpu/linear.py), which reads each weight
    once at close to the read bandwidth; oneDNN's bf16 matmul read SmolLM2's at 13-19 GB/s.
    CPU fp32: MKL runs `weight @ x.T` about 1.5x faster than `x @ weight.T` for the skinny
    activations of decode and chunked prefill (30 matmuls of 3072x576: 41.6 vs 66.2 ms at T=8,
    78 vs 113 ms at T=32, on this 2-core EPYC VM), with the same results to within ~1e-5
    (bitwise equal at most T). Elsewhere (prefill chunks in bf16, CUDA) F.linear."""
    if x.device.type != "cpu":
        return F.linear(x, weight)
    if weight.dtype == torch.bfloat16:
        out = cpu_linear.linear_bf16(x, weight)
        return out if out is not None else F.linear(x, weight)
    if weight.dtype != torch.float32:
        return F.linear(x, weight)
    return torch.mm(weight, x.t()).t().contiguous()


def rms_norm(norm: nn.RMSNorm, x: torch.Tensor, residual: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(s), s) for s = x + residual, or s = x without a residual: on CPU bf16 one C call
    (engine/cpu/norm.py), else PyTorch's ops. A norm with hooks (calibration watches the
    norms' outputs) always runs as a module, so the hooks fire."""
    if not _has_hooks(norm):
        fused = cpu_norm.rms_norm_bf16(x, norm.weight, _eps(norm, x), residual)
        if fused is not None:
            normed, total = fused
            return normed, x if total is None else total
    total = x if residual is None else x + residual
    return norm(total), total


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _eps(norm: nn.RMSNorm, x: torch.Tensor) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D) rotated by cos/sin (T, 1, D): x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)  # (T, heads, D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (T, heads, D)
    return x * cos + rotated * sin


class SelfAttention(nn.Module):
    """Projections and RoPE; the paged cache and the attention itself are the `Attention`
    object the runner passes in for this layer (engine/attention/layer.py)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        qkv_out = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: Attention, metadata: list[AttentionMetadata]) -> torch.Tensor:
        t = x.shape[0]
        h, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = linear(x, self.qkv_proj.weight).view(t, h + 2 * hk, d)  # (T, H + 2Hk, D)
        # q and k are adjacent in the fused output: rotate both at once (on CPU bf16 in place,
        # one C call; qkv is this step's own fresh tensor)
        if cpu_pointwise.rope_bf16(qkv, h + hk, cos, sin):
            qk = qkv[:, : h + hk]
        else:
            qk = apply_rope(qkv[:, : h + hk], cos, sin)  # (T, H + Hk, D)
        out = self.attend(qk, qkv[:, h + hk:], attention, metadata)  # (T, H * D)
        return linear(out, self.o_proj.weight)  # (T, C)

    def attend(self, qk: torch.Tensor, v: torch.Tensor, attention: Attention,
               metadata: list[AttentionMetadata]) -> torch.Tensor:
        """Rotated q and k (T, H + Hk, D), v (T, Hk, D) -> attention output (T, H * D)."""
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]  # (T, H, D), (T, Hk, D)
        out = attention.forward(q, k, v, metadata)  # (T, H, D)
        return out.reshape(qk.shape[0], self.num_heads * self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size,
                                      bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_proj.weight)  # (T, 2I): gate, then up
        act = cpu_pointwise.silu_mul_bf16(gate_up)  # one C call on CPU bf16, else None
        if act is None:
            gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
            act = F.silu(gate) * up
        return linear(act, self.down_proj.weight)  # (T, C)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = SelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: Attention, metadata: list[AttentionMetadata]) -> torch.Tensor:
        if self._fusable(x):
            return self._forward_fused(x, cos, sin, attention, metadata)
        h = self.attn(rms_norm(self.attn_norm, x)[0], cos, sin, attention, metadata)  # (T, C)
        normed, x = rms_norm(self.mlp_norm, h, residual=x)  # norm(x + h), x + h
        return x + self.mlp(normed)  # (T, C)

    def _fusable(self, x: torch.Tensor) -> bool:
        """CPU bf16 decode sizes, and no hooks on the modules the fused calls bypass
        (calibration watches the norms' outputs)."""
        # x first: on GPU, fp32 and long prefill chunks the weights are never fetched
        return (cpu_layer.applies(x)
                and not any(map(_has_hooks, (self.attn_norm, self.attn, self.mlp_norm, self.mlp)))
                and cpu_layer.weights_apply(
                    self.attn.qkv_proj.weight, self.attn.o_proj.weight,
                    self.mlp.gate_up_proj.weight, self.mlp.down_proj.weight,
                    self.attn_norm.weight, self.mlp_norm.weight))

    def _forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       attention: Attention, metadata: list[AttentionMetadata]) -> torch.Tensor:
        """The same layer as two C calls around attention (engine/cpu/llama_layer.py), with
        bit-identical results: the decode step's matmuls then stream back to back."""
        attn, mlp = self.attn, self.mlp
        rotated = attn.num_heads + attn.num_kv_heads  # q and k
        qkv = cpu_layer.attention_in(x, self.attn_norm.weight, _eps(self.attn_norm, x),
                                     attn.qkv_proj.weight, cos, sin, rotated, attn.head_dim)
        out = attn.attend(qkv[:, :rotated], qkv[:, rotated:], attention, metadata)  # (T, H*D)
        return cpu_layer.mlp_out(out, x, attn.o_proj.weight, self.mlp_norm.weight,
                                 _eps(self.mlp_norm, x), mlp.gate_up_proj.weight,
                                 mlp.down_proj.weight)  # (T, C)


class Llama(nn.Module):
    """Decoder-only Llama. RoPE tables are fp32 buffers (not in the state dict), indexed by the
    absolute position of every token, so chunks and decodes of any request mix freely."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # tied (SmolLM2): logits reuse the embedding matrix; no separate lm_head parameter
        self.lm_head = (None if config.tie_word_embeddings else
                        nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rope(self, device: torch.device) -> None:
        """Recompute the fp32 RoPE tables (after building on the meta device, or a dtype cast)."""
        self.rope_cos, self.rope_sin = rope_tables(self.config, device)

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.config.head_dim)

    def kv_cache_spec(self, block_size: int, kv_dtype: str) -> KVCacheSpec:
        """What each layer stores per block of the paged cache (see engine/kv_cache)."""
        return self.config.kv_cache_spec(block_size, kv_dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: list[AttentionMetadata], attention: list[Attention]) -> torch.Tensor:
        """input_ids, positions (T,) -> final hidden states (T, C), normed. `metadata` is the
        step seen by each KV cache group, `attention[i]` layer i's paged attention."""
        x = self.embed_tokens(input_ids)  # (T, C)
        # HF casts cos/sin to the activation dtype before rotating; so do we
        cos = self.rope_cos[positions].to(x.dtype).unsqueeze(1)  # (T, 1, D)
        sin = self.rope_sin[positions].to(x.dtype).unsqueeze(1)  # (T, 1, D)
        stacked = self._decode_layers_fused(x, cos, sin, attention, metadata)
        if stacked is not None:
            x = stacked
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, attention[layer.layer], metadata)  # (T, C)
        return rms_norm(self.norm, x)[0]  # (T, C)

    def _decode_layers_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             attention: list[Attention], metadata: list[AttentionMetadata]
                             ) -> torch.Tensor | None:
        """A CPU bf16 decode-only step through every layer in one C call
        (engine/cpu/llama_layer.py), with the op-by-op path's results bit for bit: one cache
        group, plain fp32 or bf16 caches under the fused attention kernel, nothing scored, no
        hooks. None where the step or a layer does not qualify."""
        if not cpu_layer.applies(x):
            return None
        caches = [attention[layer.layer].caches for layer in self.layers]
        group = caches[0][0].group_id
        meta = metadata[group]
        if (meta.num_prefill_tokens or meta.mass_mode is not None
                or meta.decode_block_tables.shape[0] != x.shape[0]):
            return None
        layers, eps = [], _eps(self.layers[0].attn_norm, x)
        for layer, shares in zip(self.layers, caches, strict=True):
            # the modules' own dicts, not attribute access: nn.Module.__getattr__ costs ~1.5 us
            # a name, ~0.4 ms a step over SmolLM2's 30 layers (timed), ~3 % of the step
            mods = layer._modules
            attn, mlp = mods["attn"], mods["mlp"]
            attn_norm, mlp_norm = mods["attn_norm"], mods["mlp_norm"]
            if (len(shares) != 1 or shares[0].group_id != group
                    or attention[layer.layer].backend.name != "cpu-kernel"
                    or any(map(_has_hooks, (layer, attn_norm, attn, mlp_norm, mlp)))
                    or _eps(attn_norm, x) != eps or _eps(mlp_norm, x) != eps):
                return None
            projections, mlp_projections = attn._modules, mlp._modules
            layers.append((attn_norm._parameters["weight"],
                           projections["qkv_proj"]._parameters["weight"],
                           projections["o_proj"]._parameters["weight"],
                           mlp_norm._parameters["weight"],
                           mlp_projections["gate_up_proj"]._parameters["weight"],
                           mlp_projections["down_proj"]._parameters["weight"],
                           shares[0]["k"], shares[0]["v"]))
        return cpu_layer.decode_layers(
            x, cos, sin, layers, self.config.num_heads, self.config.head_dim, eps,
            meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens,
            self.attention_scale, caches[0][0].null_block)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, C) -> fp32 logits (N, V). Only call it on the rows you sample from: the
        LM head is the biggest matmul of a decode step."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight).float()  # (N, V)
