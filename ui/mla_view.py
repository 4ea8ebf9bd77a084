"""The MLA page's helpers: KV bytes per token of MHA / GQA / MLA for one attention shape
(formula beside an allocated cache), tokens per memory budget, and KL against latent rank for
SmolLM2 converted to MLA (`cli.py convert-mla`, scored by `cli.py quality`)."""

from __future__ import annotations

import dataclasses

import altair as alt
import pandas as pd

from engine.models.hf_config import ModelFolderError, looks_like_path, read_folder_config
from engine.models.mla_config import MLAConfig
from engine.models.mla_shapes import KINDS, PAPER, AttentionShape

# README's table (bench/mla_rank.py: 4 held-set passages, context 512, 32 tokens scored each,
# fp32), shown while the store holds no evaluation of a converted folder
README_KL = pd.DataFrame([
    (16, 16, 2.4847, 0.2266, 64),
    (64, 16, 2.1227, 0.2109, 112),
    (128, 16, 1.9164, 0.2734, 176),
    (256, 16, 1.8117, 0.2656, 304),
    (336, 16, 1.8289, 0.2734, 384),
    (288, 32, 0.3283, 0.6562, 384),
    (240, 48, 0.0621, 0.8516, 384),
    (48, 64, 0.9447, 0.4531, 240),
    (96, 64, 0.4623, 0.5703, 288),
    (144, 64, 0.2127, 0.7031, 336),
    (192, 64, 0.0000, 1.0000, 384),
], columns=["rank", "rope_dims", "kl_mean", "top1", "kv_values_per_token_per_layer"])


def footprint(shape: AttentionShape, kv_dtype: str, budget_bytes: int,
              gqa_kv_heads: int | None = None) -> pd.DataFrame:
    """One row per kind: values and bytes per token per layer (formula, allocated), bytes per
    token over all layers, and tokens that fit in `budget_bytes`."""
    if gqa_kv_heads:
        shape = dataclasses.replace(shape, num_kv_heads=gqa_kv_heads)
    rows = []
    for kind in KINDS:
        # the spec's figure: elements x bytes (the paper's formula), plus any scales
        formula = shape.spec(kind, kv_dtype).bytes_per_token
        measured = shape.measured_bytes(kind, kv_dtype)
        per_token = measured * shape.num_layers
        rows.append({"kind": kind, "values_per_layer": shape.elements(kind),
                     "formula_bytes_per_layer": formula,
                     "allocated_bytes_per_layer": measured,
                     "bytes_per_token": per_token,
                     "tokens_in_budget": int(budget_bytes // per_token)})
    df = pd.DataFrame(rows)
    df["vs_mha"] = df["bytes_per_token"] / df.loc[df["kind"] == "MHA", "bytes_per_token"].iloc[0]
    return df


def footprint_chart(df: pd.DataFrame, title: str) -> alt.Chart:
    """Bytes per token per layer by kind: the formula and the allocated cache side by side."""
    long = df.melt(id_vars="kind", value_vars=["formula_bytes_per_layer",
                                               "allocated_bytes_per_layer"],
                   var_name="source", value_name="bytes")
    long["source"] = long["source"].map({"formula_bytes_per_layer": "formula",
                                         "allocated_bytes_per_layer": "allocated cache"})
    return alt.Chart(long, title=title).mark_bar().encode(
        x=alt.X("kind:N", title=None, sort=list(KINDS)),
        xOffset=alt.XOffset("source:N"),
        y=alt.Y("bytes:Q", title="KV bytes per token per layer"),
        color=alt.Color("source:N", title=None),
        tooltip=["kind", "source", alt.Tooltip("bytes:Q", format=",.1f")])


def paper_figures() -> pd.DataFrame:
    """The DeepSeek-V2 paper's reference figures, with the ratio they imply."""
    mla, mha = (PAPER["elements_per_token_per_layer"][k] for k in ("MLA", "MHA"))
    return pd.DataFrame([
        {"figure": "MLA elements per token per layer (d_c + d_R = 512 + 64)", "value": mla},
        {"figure": "MHA elements per token per layer (2 n_h d_h = 2 x 128 x 128)",
         "value": mha},
        {"figure": "MLA / MHA", "value": round(mla / mha, 4)},
        {"figure": "KV cache reduction vs DeepSeek 67B (paper)",
         "value": PAPER["kv_cache_reduction_vs_deepseek_67b"]},
        {"figure": "max generation throughput vs DeepSeek 67B (paper)",
         "value": PAPER["max_generation_throughput_vs_deepseek_67b"]},
    ])


def _conversion(model: str) -> MLAConfig | None:
    if not isinstance(model, str) or not looks_like_path(model):
        return None
    try:
        config = read_folder_config(model)
    except ModelFolderError:  # the folder is gone: its figures stay in the store
        return None
    return config if isinstance(config, MLAConfig) and config.converted_from else None


def conversion_results(results: pd.DataFrame) -> pd.DataFrame:
    """Stored quality results of converted folders, with their rank and RoPE dims; the
    README's figures when there are none."""
    rows = []
    for _, r in results.iterrows():
        config = _conversion(r["model"])
        if config is None:
            continue
        rows.append({"rank": config.kv_lora_rank, "rope_dims": config.qk_rope_head_dim,
                     "kl_mean": r["kl_mean"], "top1": r["top1"], "kv_dtype": r["kv_dtype"],
                     "kv_values_per_token_per_layer": config.head_dim, "source": "store"})
    if not rows:
        return README_KL.assign(kv_dtype="fp32", source="README")
    return pd.DataFrame(rows)


def kl_rank_chart(df: pd.DataFrame) -> alt.LayerChart:
    """KL from SmolLM2 against latent rank, one line per kept RoPE dims."""
    data = df.assign(series=df["rope_dims"].map(lambda d: f"RoPE {d} dims per head"),
                     top1_pct=100 * df["top1"])
    base = alt.Chart(data, title="SmolLM2 as MLA: KL from SmolLM2 vs latent rank")
    enc = dict(x=alt.X("rank:Q", title="kv_lora_rank (latent values per token per layer)"),
               y=alt.Y("kl_mean:Q", title="mean KL(SmolLM2 || MLA), nats",
                       scale=alt.Scale(type="symlog", constant=0.001)),
               color=alt.Color("series:N", title=None))
    tips = [alt.Tooltip("rank:Q"), alt.Tooltip("rope_dims:Q"),
            alt.Tooltip("kl_mean:Q", format=".4f", title="KL"),
            alt.Tooltip("top1_pct:Q", format=".1f", title="top-1 %"),
            alt.Tooltip("kv_values_per_token_per_layer:Q", title="cached values/layer")]
    return alt.layer(base.mark_line().encode(**enc),
                     base.mark_circle(size=70).encode(**enc, tooltip=tips))
