"""Experiment page under AppTest: a run from the form lands in the database, Stop keeps an
interrupted run, and bad settings are explained under their widgets before anything runs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from store import RunReader
from ui import session

ROOT = Path(__file__).resolve().parent.parent
PAGE = "pages/1_Experiment.py"


def open_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30)
    at.switch_page(PAGE).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def tiny_synthetic(at: AppTest, *, requests: int, output: int) -> None:
    """Fill the form: the tiny model on the CPU with a small synthetic workload."""
    at.selectbox(key="cfg_model").set_value("tiny")
    at.selectbox(key="cfg_device").set_value("cpu")
    at.radio(key="cfg_budget_mode").set_value("blocks")
    at.radio(key="cfg_workload_kind").set_value("synthetic")
    at.number_input(key="cfg_max_model_len").set_value(256)
    at.run()
    at.number_input(key="cfg_num_blocks").set_value(48)
    at.number_input(key="cfg_num_requests").set_value(requests)
    for name in ("output_len_min", "output_len_max"):
        at.number_input(key=f"cfg_{name}").set_value(output)
    at.toggle(key="cfg_ignore_eos").set_value(True)
    at.text_input(key="cfg_name").set_value("from the form")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]


def errors_beside(at: AppTest, widget_key: str) -> list[str]:
    """Error messages in the same column as the widget (the slot right under it)."""
    for column in at.columns:
        if any(getattr(w, "key", None) == widget_key for w in column):
            return [e.value for e in column.error]
    raise AssertionError(f"no column holds {widget_key}")


def test_form_renders_every_knob(store):
    at = open_page()
    keys = {w.key for w in (*at.selectbox, *at.number_input, *at.radio, *at.toggle)}
    for knob in ("model", "device", "dtype", "kv_dtype", "block_size", "budget_mode",
                 "prefix", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                 "keyframe_interval", "seed", "temperature", "top_p", "top_k", "ignore_eos",
                 "workload_kind"):
        assert f"cfg_{knob}" in keys, knob
    assert not at.button(key="run").disabled


def test_a_tiny_workload_runs_from_the_form_into_the_database(store):
    at = open_page()
    tiny_synthetic(at, requests=3, output=4)
    at.button(key="run").click().run()
    assert not at.exception
    live = at.session_state[session.LIVE_KEY]
    assert live.join(120), live.phase
    at.run()
    assert not at.exception
    assert live.phase == "finished", live.error
    runs = RunReader(store).list_runs()
    assert runs["name"].tolist() == ["from the form"]
    assert runs["status"].iloc[0] == "finished" and runs["num_steps"].iloc[0] > 0
    assert any("Finished" in s.value for s in at.success)
    assert len(at.get("vega_lite_chart")) == 4  # throughput, blocks, hit rate, preemptions
    assert [m.label for m in at.metric][:2] == ["output tokens/s", "prefix hit rate"]
    # on a CPU the summary says once that there are no GPU readings
    notes = [c.value for c in at.caption if "NVIDIA" in c.value]
    assert notes == [live.summary["gpu_note"]] and notes[0].startswith("no NVIDIA GPU (")


def test_stop_ends_the_run_cleanly_as_interrupted(store):
    at = open_page()
    tiny_synthetic(at, requests=8, output=400)
    at.button(key="run").click().run()
    live = at.session_state[session.LIVE_KEY]
    deadline = time.monotonic() + 120
    while len(live.steps) < 3 and not live.done and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not live.done, "the run ended before it could be stopped"
    at.run()  # the live panel with its Stop button
    assert at.get("vega_lite_chart"), "no live charts while running"
    at.button(key="experiment_stop").click().run()
    assert live.join(60)
    at.run()
    assert live.phase == "interrupted", live.error
    assert any("Stopped" in w.value for w in at.warning)
    info = RunReader(store).run_info(live.run_id)
    assert info.status == "interrupted"
    assert info.summary["stopped"] is True
    assert info.num_steps == len(RunReader(store).steps(live.run_id)) >= 3


@pytest.mark.parametrize(("widget", "value", "message"), [
    ("cfg_block_size", 24, "not a power of two"),
    ("cfg_max_num_batched_tokens", 4, "must be >= max_num_seqs"),
])
def test_a_bad_setting_is_explained_under_its_widget(store, widget, value, message):
    at = open_page()
    at.number_input(key=widget).set_value(value).run()
    assert not at.exception
    assert any(message in e for e in errors_beside(at, widget)), [e.value for e in at.error]
    assert at.button(key="run").disabled


def test_a_bad_byte_budget_is_explained_under_its_widget(store):
    at = open_page()
    at.radio(key="cfg_budget_mode").set_value("bytes").run()
    at.text_input(key="cfg_kv_budget").set_value("lots").run()
    assert any("cannot read 'lots'" in e for e in errors_beside(at, "cfg_kv_budget"))
    at.text_input(key="cfg_kv_budget").set_value("1KiB").run()
    assert any("raise the budget" in e for e in errors_beside(at, "cfg_kv_budget"))
    assert at.button(key="run").disabled


def test_a_bad_layer_policy_is_explained_under_its_widget(store):
    at = open_page()
    at.selectbox(key="cfg_model").set_value("tiny").run()
    at.text_input(key="cfg_policy").set_value("0:full").run()  # layer 1 has no policy
    assert any("layer 1 KV head 0 has no policy" in e and "0:full; 1:full" in e
               for e in errors_beside(at, "cfg_policy")), [e.value for e in at.error]
    assert at.button(key="run").disabled
    at.text_input(key="cfg_policy").set_value("0:full; 1:full").run()
    assert not errors_beside(at, "cfg_policy") and not at.button(key="run").disabled


def test_a_policy_preset_fills_the_policy_field_for_the_model(store):
    at = open_page()
    at.selectbox(key="cfg_policy_preset").set_value(
        "full first and last layers, window elsewhere").run()
    assert at.text_input(key="cfg_policy").value == "0:full; 1-28:window(4,256); 29:full"
    at.selectbox(key="cfg_model").set_value("tiny").run()
    options = at.selectbox(key="cfg_policy_preset").options
    assert "full first and last layers, window elsewhere" not in options  # only 2 layers
    at.selectbox(key="cfg_policy_preset").set_value(
        "DuoAttention-style: half the KV heads full, the rest sink + window").run()
    assert at.text_input(key="cfg_policy").value == "0-1/h0:full; 0-1/h1:window(4,128)"
    assert not errors_beside(at, "cfg_policy")


def test_a_bad_workload_file_names_the_line(store):
    at = open_page()
    at.radio(key="cfg_workload_kind").set_value("file").run()
    bad = b'{"prompt": "hello"}\n{"prompt": 3}\n'
    at.file_uploader(key="cfg_upload").upload("bad.jsonl", bad, "application/jsonl").run()
    assert not at.exception
    messages = [e.value for e in at.error]
    assert any("bad.jsonl line 2" in m and '"prompt"' in m for m in messages), messages
    assert at.button(key="run").disabled
