"""Sweep page under AppTest: the axes form counts points and explains bad values, a stored
sweep plots any metric against any axis with links to its runs' replays, and a sweep launched
from the page runs on a local Ray (started in this process, 2 CPUs) until Stop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.config import RunConfig, WorkloadSpec
from engine.run import run
from store import RunWriter
from store import sweeps as store_sweeps
from sweep import SweepSpec, create_sweep, parse_axis, ray_setup
from ui import charts
from ui.sweep_view import plot_frame

ROOT = Path(__file__).resolve().parent.parent
PAGE = "pages/7_Sweep.py"
BASE = RunConfig(model="tiny", device="cpu", max_model_len=128, keyframe_interval=10,
                 workload=WorkloadSpec(kind="synthetic", num_requests=4, prompt_len_min=16,
                                       prompt_len_max=32, output_len_min=4, output_len_max=8,
                                       num_prefix_groups=1, shared_prefix_len=24))


def open_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30)
    at.switch_page(PAGE).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def seed_sweep(store, model) -> int:
    """A 2 x 2 sweep (block size x KV budget) run in this process, without Ray."""
    spec = SweepSpec(BASE, [parse_axis("block_size=8,16"), parse_axis("kv_budget=1MiB,4MiB")],
                     name="seeded")
    sweep_id = create_sweep(store, spec)
    for point, config in enumerate(spec.point_configs()):
        writer = RunWriter(store, config, sweep_id=sweep_id, sweep_point=point)
        writer.close(summary=run(config, writer, model=model).summary)
    store_sweeps.end_sweep(store, sweep_id, "finished")
    return sweep_id


def fill_base(at: AppTest, *, output: int) -> None:
    """The tiny model on the CPU with a small synthetic workload."""
    at.selectbox(key="cfg_model").set_value("tiny")
    at.selectbox(key="cfg_device").set_value("cpu")
    at.radio(key="cfg_workload_kind").set_value("synthetic")
    at.number_input(key="cfg_max_model_len").set_value(512)
    at.run()
    at.number_input(key="cfg_num_requests").set_value(4)
    for name in ("output_len_min", "output_len_max"):
        at.number_input(key=f"cfg_{name}").set_value(output)
    at.toggle(key="cfg_ignore_eos").set_value(True)
    at.run()


def test_the_form_counts_points_and_explains_bad_axes(store):
    at = open_page()
    assert any("No sweeps yet" in i.value for i in at.info)
    fill_base(at, output=8)
    at.text_input(key="sweep_axis0_values").set_value("8,16")
    at.selectbox(key="sweep_axis1_name").set_value("num_blocks").run()  # enables its values
    at.text_input(key="sweep_axis1_values").set_value("32,64").run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "**4 points** (2 block_size × 2 num_blocks)" in text
    assert "1 invalid in combination" in text  # 32 blocks of 8 tokens < 512
    assert not at.button(key="sweep_launch").disabled
    at.text_input(key="sweep_axis0_values").set_value("8,24").run()
    assert any("not a power of two" in e.value for e in at.error)
    assert at.button(key="sweep_launch").disabled


def test_a_stored_sweep_plots_any_metric_against_any_axis(store, tiny_model):
    sweep_id = seed_sweep(store, tiny_model)
    at = open_page()
    assert at.selectbox(key="sweep_pick").value == sweep_id
    assert [m.value for m in at.metric][:3] == ["4", "4", "0"]
    chart = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    assert chart["title"] == "output tokens/s vs block_size"
    at.selectbox(key="sweep_metric").set_value("prefix_hit_rate")
    at.selectbox(key="sweep_x").set_value("kv_budget").run()
    chart = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    assert chart["title"] == "prefix hit rate vs KV budget (MiB)"
    dots = chart["layer"][1]["encoding"]
    assert dots["x"]["field"] == "kv_budget" and dots["color"]["field"] == "block_size"
    table = at.dataframe[0].value
    assert len(table) == 4 and (table["status"] == "finished").all()
    assert table["replay"].str.match(r"/Replay\?run=\d+").all()
    links = [p.proto for p in at.get("page_link") if "Replay run #" in p.proto.label]
    assert len(links) == 1 and links[0].query_string == f"run={table['replay'][0][12:]}"
    assert at.get("download_button")


def test_plot_frame_and_chart_builder():
    points = store_sweeps.pd.DataFrame({
        "point": [0, 1, 2, 3], "run_id": [1, 2, 3, 4], "kv_budget": [2**20, 2**24] * 2,
        "block_size": [8, 8, 16, 16], "output_tokens_per_s": [1.0, 2.0, 3.0, 4.0]})
    df, titles = plot_frame(points, ["kv_budget", "block_size"])
    assert df["kv_budget"].tolist() == [1.0, 16.0, 1.0, 16.0] and "MiB" in titles["kv_budget"]
    spec = charts.sweep_chart(df, "kv_budget", "output_tokens_per_s", "block_size").to_dict()
    assert spec["layer"][0]["encoding"]["x"]["scale"]["type"] == "log"  # 16x span
    assert spec["layer"][0]["encoding"]["y"]["aggregate"] == "mean"


@pytest.fixture
def ray_in_process():
    yield
    ray_setup.shutdown()  # the page started a local Ray in this process


def test_a_sweep_launched_from_the_page_runs_on_ray_until_stop(store, ray_in_process):
    at = open_page()
    fill_base(at, output=200)
    at.text_input(key="sweep_axis0_values").set_value("8,16,32")
    at.selectbox(key="sweep_axis1_name").set_value("max_num_seqs").run()
    at.text_input(key="sweep_axis1_values").set_value("2,4")
    at.number_input(key="sweep_parallel").set_value(1).run()
    at.button(key="sweep_launch").click().run()
    assert not at.exception, [e.value for e in at.exception]
    live = at.session_state["sweep_live"]
    deadline = time.monotonic() + 180
    while live.progress.done < 1 and not live.done and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live.progress.done >= 1 and not live.done, live.phase
    at.run()
    assert at.get("progress"), "no progress bar while the sweep runs"
    at.button(key="sweep_stop").click().run()
    assert live.join(120)
    at.run()
    assert live.phase == "interrupted", live.error
    assert any("stopped" in w.value for w in at.warning)
    points = store_sweeps.sweep_points(store, live.sweep_id)
    finished = points[points["status"] == "finished"]
    assert 1 <= len(finished) < 6
    assert set(points["status"]) <= {"finished", "interrupted", "pending"}
    assert store_sweeps.sweep_info(store, live.sweep_id).status == "interrupted"
