"""SmolLM2's grouped-query attention turned into MLA without training (MHA2MLA / TransMLA).

Per layer and KV head j (SmolLM2: 30 layers, 9 query heads, 3 KV heads of 64 dims):

1. Partial RoPE (MHA2MLA's 2-norm criterion): of the head's 32 frequency pairs, keep RoPE on
   the D/2 pairs with the largest  mean ||k_pair|| * sum over the group's query heads of
   mean ||q_pair||  on calibration text. Their key rows become the decoupled RoPE key k_pe of
   RoPE head j (D values, DeepSeek's interleaved pair layout); the query heads of group j keep
   those pairs as their q_pe. Exact: RoPE and q.k are unchanged for the kept pairs.
2. The other 64 - D key dims of the 3 KV heads lose RoPE (the approximation partial RoPE
   makes) and join the 3 x 64 value dims in one matrix M (3(64 - D) + 192 rows). A joint
   low-rank factorisation gives the latent: c_kv = U^T M_s x with U the top-R eigenvectors
   of M_s Sigma M_s^T (Sigma: the calibration inputs' covariance, so the rank is spent where
   the activations are; M_s scales the K and V blocks to equal output energy), and the
   up-projections W_UK, W_UV are U's rows, unscaled. At R = rows(M) this is exact.
3. Everything else is copied: the query projection (rows reordered to [nope ; rope]), o_proj,
   MLPs, norms, the tied embeddings. The latent gets no RMSNorm (`kvlab_kv_latent_norm`).

So at full rank with all RoPE dims (D = 64, R = 192) the model computes SmolLM2 exactly; below
that, two things are approximated: RoPE removed from 64 - D dims of each key, and K_nope/V
through a rank-R latent. Cache per token per layer: R + 3D values (SmolLM2's GQA: 384).

Calibration reads the held set's last four passages (`cli.py quality` scores the first eight
by default), so the figures are not measured on the calibration text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kv_cache.storage import PagedKVCache
from engine.model_runner import ModelRunner
from engine.models.llama import Llama
from engine.models.loader import LoadedModel
from engine.sequence import Sequence

CALIBRATION_PASSAGES = slice(8, 12)  # of the held set: the ones quality does not score


@dataclass
class LayerStats:
    """Calibration sums of one layer: input covariance and per-pair q/k norms."""

    cov: torch.Tensor  # (C, C) float64, sum of x x^T
    q_norm: torch.Tensor  # (H, 32) sum over tokens of each pair's norm
    k_norm: torch.Tensor  # (Hk, 32)
    tokens: int = 0


def calibrate(loaded: LoadedModel, token_ids: list[list[int]]) -> list[LayerStats]:
    """Run the sequences through the model, capturing every layer's attention input."""
    model, cfg = loaded.model, loaded.config
    assert isinstance(model, Llama), "convert-mla starts from a Llama (GQA) model"
    h, hk, d, c = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    stats = [LayerStats(torch.zeros(c, c, dtype=torch.float64), torch.zeros(h, d // 2),
                        torch.zeros(hk, d // 2)) for _ in range(cfg.num_layers)]

    def pair_norms(y: torch.Tensor, heads: int) -> torch.Tensor:
        y = y.reshape(-1, heads, 2, d // 2)  # (T, heads, 2, D/2): halves x_i, x_{i + D/2}
        return y.square().sum(dim=2).sqrt().sum(dim=0)  # (heads, D/2)

    def hook(layer: int):
        def capture(_module, _inputs, x: torch.Tensor) -> None:
            s, w = stats[layer], model.layers[layer].attn.qkv_proj.weight
            x64 = x.double()
            s.cov += x64.T @ x64
            qk = (x @ w[: (h + hk) * d].T).float()  # (T, (H + Hk) * D)
            s.q_norm += pair_norms(qk[:, : h * d], h)
            s.k_norm += pair_norms(qk[:, h * d:], hk)
            s.tokens += x.shape[0]
        return capture

    handles = [layer.attn_norm.register_forward_hook(hook(i))
               for i, layer in enumerate(model.layers)]
    try:
        bs = 16
        blocks = sum(-(-len(t) // bs) for t in token_ids)
        cache = PagedKVCache.for_model(cfg, blocks, bs, "fp32", loaded.device)
        runner, next_block = ModelRunner(loaded, cache), 0
        batch = []
        for i, ids in enumerate(token_ids):
            n = -(-len(ids) // bs)
            table = list(range(next_block, next_block + n))
            next_block += n
            batch.append((Sequence(i, list(ids), len(ids), 1, block_tables=(table,)), len(ids)))
        runner.execute(batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def kept_pairs(s: LayerStats, group: int, rope_dims: int) -> list[list[int]]:
    """Per KV head: the rope_dims / 2 frequency pairs kept, ascending."""
    q = s.q_norm.view(s.k_norm.shape[0], group, -1).sum(dim=1)  # (Hk, D/2)
    score = s.k_norm * q  # (Hk, D/2)
    top = score.topk(rope_dims // 2, dim=-1).indices
    return [sorted(row) for row in top.tolist()]


def _dims(pairs: list[int], half: int) -> tuple[list[int], list[int]]:
    """(nope dims, rope dims in interleaved order) of a head, HF half-split indexing."""
    rope = [x for i in pairs for x in (i, i + half)]
    taken = set(rope)
    return [x for x in range(2 * half) if x not in taken], rope


def convert_layer(w_qkv: torch.Tensor, s: LayerStats, heads: int, kv_heads: int, rank: int,
                  rope_dims: int) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """One layer's q_proj, kv_a_proj_with_mqa, kv_b_proj (DeepSeek names) and kept pairs."""
    d = w_qkv.shape[0] // (heads + 2 * kv_heads)
    group, half = heads // kv_heads, d // 2
    wq = w_qkv[: heads * d].view(heads, d, -1).double()  # (H, D, C)
    wk = w_qkv[heads * d:(heads + kv_heads) * d].view(kv_heads, d, -1).double()
    wv = w_qkv[(heads + kv_heads) * d:].double()  # (Hk * D, C)
    pairs = kept_pairs(s, group, rope_dims)
    dims = [_dims(p, half) for p in pairs]
    q_rows = [wq[h, dims[h // group][0] + dims[h // group][1]] for h in range(heads)]
    k_pe = torch.cat([wk[j, dims[j][1]] for j in range(kv_heads)])  # (Hk * Dr, C)
    k_nope = torch.cat([wk[j, dims[j][0]] for j in range(kv_heads)])  # (Hk * Dn, C)
    sigma = s.cov / max(1, s.tokens)  # (C, C)

    def energy(m: torch.Tensor) -> float:
        return float(torch.einsum("ij,jk,ik->", m, sigma, m)) if m.numel() else 1.0

    a, b = energy(k_nope) ** -0.5, energy(wv) ** -0.5  # K and V blocks at equal energy
    m = torch.cat([a * k_nope, b * wv])  # (Hk * (Dn + D), C)
    if rank > m.shape[0]:
        raise ValueError(f"rank {rank} exceeds {m.shape[0]}, the rank of K_nope and V "
                         f"together at {rope_dims} RoPE dims (that rank is lossless)")
    _, vecs = torch.linalg.eigh(m @ sigma @ m.T)  # ascending eigenvalues
    u = vecs[:, -rank:].flip(-1)  # (rows, R): the top-R directions, largest first
    dn = d - rope_dims
    u_k = (u[: kv_heads * dn] / a).view(kv_heads, dn, rank)
    u_v = (u[kv_heads * dn:] / b).view(kv_heads, d, rank)
    kv_b = torch.cat([torch.cat([u_k[h // group], u_v[h // group]]) for h in range(heads)])
    weights = {"q_proj": torch.cat(q_rows), "kv_a_proj_with_mqa": torch.cat([u.T @ m, k_pe]),
               "kv_b_proj": kv_b}
    return {k: v.float().contiguous() for k, v in weights.items()}, pairs


@dataclass
class Conversion:
    """What `convert` wrote, and the cache it implies."""

    folder: Path
    rank: int
    rope_dims: int
    calibration_tokens: int
    kv_values_per_token_per_layer: int  # R + Hk * D
    gqa_values_per_token_per_layer: int  # 2 * Hk * head_dim of the source

    def to_dict(self, dtype_bytes: int = 4, num_layers: int = 30) -> dict[str, object]:
        mla = self.kv_values_per_token_per_layer * num_layers * dtype_bytes
        gqa = self.gqa_values_per_token_per_layer * num_layers * dtype_bytes
        return {"folder": str(self.folder), "rank": self.rank, "rope_dims": self.rope_dims,
                "calibration_tokens": self.calibration_tokens,
                "kv_values_per_token_per_layer": self.kv_values_per_token_per_layer,
                "kv_bytes_per_token": mla, "gqa_kv_bytes_per_token": gqa,
                "fraction_of_gqa": mla / gqa, "dtype_bytes": dtype_bytes}


def calibration_ids(tokenizer, num_tokens: int, seq_len: int = 1024) -> list[list[int]]:
    """`num_tokens` of the calibration passages, cut into sequences of `seq_len`."""
    from engine.quality import held_set

    ids = [t for text in held_set(12)[CALIBRATION_PASSAGES] for t in tokenizer.encode(text)]
    ids = ids[:num_tokens]
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]


def convert(loaded: LoadedModel, rank: int, rope_dims: int, out: Path,
            calibration_tokens: int = 2048) -> Conversion:
    """Convert SmolLM2 (`loaded`, fp32) and write an HF-format DeepSeek-V2 folder to `out`."""
    from safetensors.torch import save_file

    cfg = loaded.config
    if rope_dims % 2 or not 2 <= rope_dims <= cfg.head_dim:
        raise ValueError(f"rope dims must be even and in 2..{cfg.head_dim}, not {rope_dims}")
    ids = calibration_ids(loaded.tokenizer, calibration_tokens)
    stats = calibrate(loaded, ids)
    sd = loaded.model.state_dict()
    tensors = {"model.embed_tokens.weight": sd["embed_tokens.weight"],
               "model.norm.weight": sd["norm.weight"]}
    indices = []
    for i, s in enumerate(stats):
        attn, p = convert_layer(sd[f"layers.{i}.attn.qkv_proj.weight"], s, cfg.num_heads,
                                cfg.num_kv_heads, rank, rope_dims)
        indices.append(p)
        g = f"model.layers.{i}."
        for name, t in attn.items():
            tensors[g + f"self_attn.{name}.weight"] = t
        tensors[g + "self_attn.o_proj.weight"] = sd[f"layers.{i}.attn.o_proj.weight"]
        gate, up = sd[f"layers.{i}.mlp.gate_up_proj.weight"].chunk(2)
        tensors[g + "mlp.gate_proj.weight"], tensors[g + "mlp.up_proj.weight"] = gate, up
        tensors[g + "mlp.down_proj.weight"] = sd[f"layers.{i}.mlp.down_proj.weight"]
        tensors[g + "input_layernorm.weight"] = sd[f"layers.{i}.attn_norm.weight"]
        tensors[g + "post_attention_layernorm.weight"] = sd[f"layers.{i}.mlp_norm.weight"]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()},
              str(out / "model.safetensors"))
    tokens = sum(len(t) for t in ids)
    config = _hf_config(cfg, rank, rope_dims, indices, tokens)
    (out / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return Conversion(out, rank, rope_dims, tokens, rank + cfg.num_kv_heads * rope_dims,
                      2 * cfg.num_kv_heads * cfg.head_dim)


def _hf_config(cfg, rank: int, rope_dims: int, indices: list[list[list[int]]],
               tokens: int) -> dict[str, object]:
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu", "kv_lora_rank": rank, "q_lora_rank": None,
        "qk_nope_head_dim": cfg.head_dim - rope_dims, "qk_rope_head_dim": rope_dims,
        "v_head_dim": cfg.head_dim, "n_routed_experts": None,
        "first_k_dense_replace": cfg.num_layers, "bos_token_id": 1, "eos_token_id": 2,
        "kvlab_converted_from": cfg.name, "kvlab_num_rope_heads": cfg.num_kv_heads,
        "kvlab_kv_latent_norm": False, "kvlab_rope_base_dim": cfg.head_dim,
        "kvlab_rope_frequency_indices": indices,
        "kvlab_conversion": {"method": "partial RoPE (2-norm) + activation-aware joint "
                                      "K_nope/V low rank", "rank": rank,
                             "rope_dims": rope_dims, "calibration_tokens": tokens},
    }
