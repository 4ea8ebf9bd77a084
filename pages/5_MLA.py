"""MLA: what Multi-head Latent Attention's cache costs beside MHA and GQA, and what converting
SmolLM2 to it costs in quality."""

import streamlit as st

from engine.config import ConfigError, parse_bytes
from engine.models.mla_shapes import SHAPES
from ui import mla_view, resources, session, widgets

st.set_page_config(page_title="MLA · KV Cache Lab", page_icon=":material/compress:", layout="wide")
session.init_state()
widgets.sidebar_nav()

st.title("MLA")
st.caption("Multi-head Latent Attention (DeepSeek-V2) caches one entry per token per layer: "
           "a joint K/V latent c_kv and a decoupled RoPE key k_pe, instead of K and V for "
           "every head. Bytes per token below come from the cache spec (elements x bytes, "
           "scales included) and from a cache really allocated by the engine's storage.")

c = st.columns(4)
name = c[0].selectbox("attention shape", list(SHAPES), key="mla_shape")
shape = SHAPES[name]
kv_dtype = c[1].selectbox("KV dtype", ["bf16", "fp32", "fp8", "int8"], key="mla_kv_dtype",
                          help="fp8 / int8 MLA: FlashMLA's layout (8-bit latent, fp32 tile "
                               "scales, bf16 RoPE key)")
gqa_heads = c[2].number_input("GQA KV heads", min_value=1, max_value=shape.num_heads,
                              value=shape.num_kv_heads, key=f"mla_gqa_{name}",
                              help="the GQA equivalent's groups (n_g)")
budget_text = c[3].text_input("memory budget", "8GiB", key="mla_budget")
try:
    budget = parse_bytes(budget_text)
except ConfigError as exc:
    st.error(f"{exc}", icon=":material/warning:")
    budget = parse_bytes("8GiB")

table = mla_view.footprint(shape, kv_dtype, budget, int(gqa_heads))
left, right = st.columns([3, 2])
with left:
    st.altair_chart(mla_view.footprint_chart(table, f"{name}: KV bytes per token per layer "
                                                    f"({kv_dtype})"), width="stretch")
with right:
    st.dataframe(table, hide_index=True, column_config={
        "values_per_layer": st.column_config.NumberColumn("values/layer"),
        "formula_bytes_per_layer": st.column_config.NumberColumn("spec B/layer",
                                                                 format="%.1f"),
        "allocated_bytes_per_layer": st.column_config.NumberColumn("allocated B/layer",
                                                                   format="%.1f"),
        "bytes_per_token": st.column_config.NumberColumn(
            f"B/token ({shape.num_layers} layers)", format="%,.0f"),
        "tokens_in_budget": st.column_config.NumberColumn(f"tokens in {budget_text}",
                                                          format="%,d"),
        "vs_mha": st.column_config.NumberColumn("vs MHA", format="percent"),
    })

st.subheader("The DeepSeek-V2 paper's figures")
st.dataframe(mla_view.paper_figures(), hide_index=True)
st.caption("576 vs 2 x 128 x 128 elements per token per layer is MLA against the MHA of "
           "DeepSeek-V2's own shape (1.8 %); the 93.3 % is against DeepSeek 67B, a different "
           "model (95 layers, GQA), as reported by the paper.")

st.subheader("SmolLM2 converted to MLA: quality against latent rank")
conv = mla_view.conversion_results(resources.quality_results())
if conv.empty:
    st.info("No converted model measured yet: `python cli.py convert-mla --rank 64 "
            "--rope-dims 16`, then `python cli.py quality --model "
            "data/models/smollm2-mla-r64-d16 --context 1024 --num-scored 128`.",
            icon=":material/lightbulb:")
else:
    if (conv["source"] == "README").all():
        st.caption("Figures from README.md (none of this store's evaluations is of a "
                   "converted folder).")
    st.altair_chart(mla_view.kl_rank_chart(conv), width="stretch")
    st.dataframe(conv.sort_values(["rope_dims", "rank"]), hide_index=True)
