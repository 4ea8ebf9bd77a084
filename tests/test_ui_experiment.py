"""Experiment page under AppTest: a run from the form lands in the database, Stop keeps an
interrupted run, and bad settings are explained under their widgets before anything runs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.config import RunConfig
from store import RunReader
from ui import config_form, resources, session

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
    assert [s.value for s in at.success] == ["Finished."]  # the elapsed time is a tile, once
    assert len(at.get("vega_lite_chart")) == 4  # throughput, blocks, hit rate, preemptions
    metrics = {m.label: m.value for m in at.metric}
    assert list(metrics)[:2] == ["output tokens/s", "prefix hit rate"]
    assert metrics["prefix hit rate"].endswith(" %")
    assert metrics["requests done"] == "3 of 3"
    assert metrics["elapsed"].endswith((" s", " ms"))
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


def start_long_run(at: AppTest, name: str = "long") -> None:
    tiny_synthetic(at, requests=8, output=400)
    at.text_input(key="cfg_name").set_value(name).run()
    at.button(key="run").click().run()
    assert not at.exception, [e.value for e in at.exception]


def wait_for_steps(live, n: int = 3) -> None:
    deadline = time.monotonic() + 120
    while len(live.steps) < n and not live.done and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not live.done, live.error


@pytest.mark.parametrize(("widget", "value", "message"), [
    ("cfg_num_blocks", 0, "number of blocks: must be at least 1"),
    ("cfg_num_blocks", -5, "number of blocks: must be at least 1"),
    ("cfg_block_size", 0, "block size (tokens): 0 is not a power of two"),
    ("cfg_keyframe_interval", 0, "keyframe every (steps): must be at least 1"),
    ("cfg_seed", -1, "seed: must be >= 0"),
    ("cfg_max_num_seqs", 0, "max running requests: must be at least 1"),
    ("cfg_num_requests", 0, "requests: must be at least 1"),
])
def test_an_invalid_value_is_refused_where_it_is_typed(store, widget, value, message):
    at = open_page()
    at.radio(key="cfg_budget_mode").set_value("blocks")
    at.radio(key="cfg_workload_kind").set_value("synthetic").run()
    at.number_input(key=widget).set_value(value).run()
    assert not at.exception
    assert at.number_input(key=widget).value == value  # kept as typed, not silently undone
    assert any(e.startswith(message) for e in errors_beside(at, widget)), [
        e.value for e in at.error]
    assert at.button(key="run").disabled


def test_a_budget_larger_than_the_machines_memory_is_refused(store, monkeypatch):
    monkeypatch.setattr(config_form, "_physical_memory", lambda: 64 * 2**20)
    at = open_page()
    at.selectbox(key="cfg_model").set_value("tiny")
    at.radio(key="cfg_budget_mode").set_value("bytes").run()
    at.text_input(key="cfg_kv_budget").set_value("1GiB").run()
    errors = errors_beside(at, "cfg_kv_budget")
    assert any(e.startswith("KV budget (bytes): ") and "more than this machine's 64.0 MiB"
               in e for e in errors), errors
    assert at.button(key="run").disabled
    at.text_input(key="cfg_kv_budget").set_value("32MiB").run()
    assert not errors_beside(at, "cfg_kv_budget") and not at.button(key="run").disabled


def test_a_gpu_budget_is_checked_against_the_gpus_memory():
    config = RunConfig(model="tiny", num_blocks=1_000_000, max_model_len=128)  # 3.8 GiB
    problem = config_form.budget_problem(config, "cuda", "this GPU's", 2**30)
    page = config.kv_groups("bf16")[0].page_size_bytes  # auto on a GPU: bf16 blocks
    assert problem is not None and "this GPU's 1.0 GiB" in problem
    assert f"choose at most {2**30 // page:,} blocks" in problem
    assert config_form.budget_problem(config, "cuda", "this GPU's", 2**40) is None


def test_a_failed_run_says_so_in_one_line_with_the_details_folded(store, monkeypatch):
    def broken(config):
        raise RuntimeError("the weights file is truncated")

    monkeypatch.setattr(resources, "get_model", broken)
    at = open_page()
    tiny_synthetic(at, requests=2, output=4)
    at.button(key="run").click().run()
    live = at.session_state[session.LIVE_KEY]
    assert live.join(60)
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "The run failed: RuntimeError: the weights file is truncated"]
    details = next((e for e in at.expander if e.label == "details"), None)
    assert details is not None
    assert "Traceback" in details.code[0].value
    assert RunReader(store).list_runs()["status"].tolist() == ["failed"]


def test_a_new_tab_reattaches_and_a_second_run_is_a_choice(store):
    first = open_page()
    start_long_run(first, "first")
    live = first.session_state[session.LIVE_KEY]
    wait_for_steps(live)
    other = open_page()  # a reload or a second tab: a new session
    assert other.session_state[session.LIVE_KEY] is live
    assert any(h.value.startswith(f"Run #{live.run_id}: first") for h in other.subheader), [
        h.value for h in other.subheader]
    assert not other.button(key="experiment_stop").disabled
    assert other.button(key="run").disabled  # one run at a time, unless asked
    other.checkbox(key="exp_another").check().run()
    tiny_synthetic(other, requests=8, output=400)
    other.text_input(key="cfg_name").set_value("second").run()
    other.checkbox(key="exp_another").check().run()
    assert not other.button(key="run").disabled
    other.button(key="run").click().run()
    assert not other.exception, [e.value for e in other.exception]
    second = other.session_state[session.LIVE_KEY]
    assert second is not live and len(session.REGISTRY.active(resources.db_url())) == 2
    other.run()
    assert any(h.value == "Also running on this server" for h in other.subheader)
    stops = [b for b in other.button if b.key and b.key.endswith("_stop")]
    assert len(stops) == 2  # both listed, each with Stop
    for button in stops:
        button.click().run()
    assert live.join(60) and second.join(60)
    assert {live.phase, second.phase} == {"interrupted"}
    assert set(RunReader(store).list_runs()["status"]) == {"interrupted"}
