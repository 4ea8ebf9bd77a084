"""MLA page under AppTest: bytes per token of MHA/GQA/MLA (spec = allocated), tokens per
budget, the paper's figures, and KL against latent rank of stored conversions."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine.config import RunConfig
from engine.quality_result import QualityResult
from store.quality import save_quality

ROOT = Path(__file__).resolve().parent.parent
PAGE = "pages/5_MLA.py"


def open_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30)
    at.switch_page(PAGE).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def converted_folder(root: Path, rank: int, rope_dims: int) -> Path:
    """Just the config.json of a convert-mla folder: what the page reads."""
    folder = root / f"smollm2-mla-r{rank}-d{rope_dims}"
    folder.mkdir()
    config = {"model_type": "deepseek_v2", "hidden_size": 576, "intermediate_size": 1536,
              "num_hidden_layers": 30, "num_attention_heads": 9, "vocab_size": 49152,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 1e5,
              "kv_lora_rank": rank, "q_lora_rank": None, "qk_nope_head_dim": 64 - rope_dims,
              "qk_rope_head_dim": rope_dims, "v_head_dim": 64, "kvlab_num_rope_heads": 3,
              "kvlab_converted_from": "smollm2", "kvlab_kv_latent_norm": False}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_deepseek_v2_shape_shows_576_values_and_equal_allocated_bytes(store):
    at = open_page()
    assert at.title[0].value == "MLA"
    at.selectbox(key="mla_shape").set_value("DeepSeek-V2").run()
    assert not at.exception
    table = at.dataframe[0].value.set_index("kind")
    assert table.loc["MLA", "values_per_layer"] == 576
    assert table.loc["MHA", "values_per_layer"] == 2 * 128 * 128
    assert (table["formula_bytes_per_layer"] == table["allocated_bytes_per_layer"]).all()
    assert table.loc["MLA", "allocated_bytes_per_layer"] == 576 * 2  # bf16
    budget = 8 * 1024**3
    assert table.loc["MLA", "tokens_in_budget"] == budget // (576 * 2 * 60)
    assert at.get("vega_lite_chart")
    paper = at.dataframe[1].value
    assert 576 in paper["value"].tolist()


def test_fp8_latent_is_flashmla_656_bytes(store):
    at = open_page()
    at.selectbox(key="mla_shape").set_value("DeepSeek-V2-Lite").run()
    at.selectbox(key="mla_kv_dtype").set_value("fp8").run()
    table = at.dataframe[0].value.set_index("kind")
    assert table.loc["MLA", "allocated_bytes_per_layer"] == 656


def test_bad_budget_is_one_clear_error(store):
    at = open_page()
    at.text_input(key="mla_budget").set_value("lots").run()
    assert any("kv_budget" in e.value for e in at.error)


def test_stored_conversions_plot_kl_against_rank(store, tmp_path):
    config = RunConfig(model="tiny", device="cpu", max_model_len=128)
    for rank, kl in ((16, 2.0), (64, 0.9), (336, 0.3)):
        folder = converted_folder(tmp_path, rank, 16)
        result = QualityResult(kl_mean=kl, top1=0.5, ppl_ref=10.0, ppl=12.0,
                               kv_bytes_per_token=100.0, kv_dtype="fp32", kv_rotate=False,
                               policy="full", model=str(folder), block_size=16, context=1024,
                               num_passages=8, num_tokens_scored=1024, source="held set")
        save_quality(store, result, config)
    at = open_page()
    conv = at.dataframe[2].value
    assert conv["rank"].tolist() == [16, 64, 336]
    assert conv["kv_values_per_token_per_layer"].tolist() == [16 + 48, 64 + 48, 336 + 48]
    assert len(at.get("vega_lite_chart")) == 2
