"""The chart builders and frame shapers in ui/ that the pages use (no Streamlit script runs
here): each chart is checked for its mark, its encodings (field and type) and the rows it
draws."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from engine.config import ConfigError
from engine.trace import BlockState
from ui import analysis, block_grid, block_grid_chart, charts, free_queue, timeline
from ui.config_form import config_from_values


def steps_frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "step": np.arange(1, n + 1), "t": np.arange(n) * 0.01, "duration_s": 0.01,
        "num_running": 4, "num_waiting": 1, "num_prefill_tokens": 0, "num_decode_tokens": 4,
        "num_generated_tokens": 4, "num_preempted": rng.integers(0, 2, n),
        "blocks_used": rng.integers(0, 60, n), "blocks_free": 64, "blocks_cached_free": 10,
        "prefix_query_tokens": 32, "prefix_hit_tokens": 16, "num_evicted": 1,
        "kv_bytes_used": 2**20, "kv_bytes_capacity": 2**22,
    })


def test_step_metrics_derive_rates_and_cumulative_counts():
    df = analysis.step_metrics(steps_frame(10))
    assert df["tokens_per_s"].iloc[-1] == pytest.approx(400.0)
    assert df["hit_rate"].iloc[-1] == pytest.approx(0.5)
    assert df["evictions"].tolist() == list(range(1, 11))
    assert df["kv_mib_used"].iloc[0] == 1.0


def test_downsample_keeps_a_long_run_light_and_its_last_step():
    df = analysis.downsample(steps_frame(10_000), max_points=1500)
    assert len(df) <= 1500 and df["step"].iloc[-1] == 10_000


def test_block_mix_splits_free_into_cached_and_not():
    mix = analysis.block_mix(steps_frame(3))
    row = mix[(mix["step"] == 1)].set_index("state")["blocks"]
    assert row["free, cached"] == 10 and row["free"] == 54


def encodings(view: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """{channel: (field, type)} of a Vega-Lite view's encodings that name a field (type None
    where Vega-Lite takes it from the paired channel, as x2 does)."""
    return {channel: (enc["field"], enc.get("type")) for channel, enc in view["encoding"].items()
            if isinstance(enc, dict) and "field" in enc}


def rows(spec: dict[str, Any], view: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rows a spec (or one of its layers) draws: inline values or its named dataset."""
    data = (view or {}).get("data") or spec["data"]
    if "values" in data:
        return data["values"]
    named = spec["datasets"][data["name"]]
    return named.to_pylist() if isinstance(named, pa.Table) else named


def test_series_chart_draws_one_line_of_the_column():
    df = analysis.step_metrics(steps_frame(12))
    spec = charts.series_chart(df, "evictions").to_dict()
    assert spec["mark"]["type"] == "line" and spec["title"] == "evictions (cumulative)"
    assert encodings(spec)["x"] == ("step", "quantitative")
    assert encodings(spec)["y"] == ("evictions", "quantitative")
    drawn = rows(spec)
    assert [r["step"] for r in drawn] == list(range(1, 13))
    assert [r["evictions"] for r in drawn] == list(range(1, 13))  # one eviction per step
    assert set(drawn[0]) == {"step", "evictions"}  # only the columns it draws go to the browser


def test_block_mix_chart_stacks_the_three_block_states():
    mix = analysis.block_mix(steps_frame(4))
    spec = charts.block_mix_chart(mix).to_dict()
    assert spec["mark"]["type"] == "area"
    enc = encodings(spec)
    assert enc["x"] == ("step", "quantitative") and enc["y"] == ("blocks", "quantitative")
    assert enc["color"] == ("state", "nominal")
    assert spec["encoding"]["y"]["stack"] == "zero"
    assert spec["encoding"]["color"]["scale"]["domain"] == ["in use", "free, cached", "free"]
    drawn = rows(spec)
    assert len(drawn) == 12  # 4 steps x 3 states
    at_1 = {r["state"]: r["blocks"] for r in drawn if r["step"] == 1}
    used = int(steps_frame(4)["blocks_used"].iloc[0])
    assert at_1 == {"in use": used, "free, cached": 10, "free": 54}


def test_with_step_rule_layers_a_rule_on_a_copy():
    spec = charts.series_chart(analysis.step_metrics(steps_frame(6)), "hit_rate").to_dict()
    ruled = charts.with_step_rule(spec, 4)
    assert "layer" not in spec and spec["mark"]["type"] == "line"  # the cached spec is intact
    assert list(spec["datasets"]) != [charts.STEP_RULE_DATA]
    line, rule = ruled["layer"]
    assert line["mark"]["type"] == "line" and encodings(line)["y"] == ("hit_rate", "quantitative")
    assert rule["mark"]["type"] == "rule" and rows(ruled, rule) == [{"step": 4}]
    assert encodings(rule)["x"] == ("step", "quantitative")
    assert len(rows(ruled, line)) == 6  # the line keeps its data
    # Only the data differs from step to step: the browser keeps the chart and swaps its data.
    later = charts.with_step_rule(spec, 5)
    assert rows(later, later["layer"][1]) == [{"step": 5}]
    assert {k: v for k, v in later.items() if k != "datasets"} == \
        {k: v for k, v in ruled.items() if k != "datasets"}


def test_with_step_rule_goes_on_top_of_a_layered_chart():
    layered = {"layer": [{"mark": {"type": "bar"}, "encoding": {}}],
               "data": {"values": [{"step": 1}]}}
    ruled = charts.with_step_rule(layered, 2, color="#111827")
    assert [layer["mark"]["type"] for layer in ruled["layer"]] == ["bar", "rule"]
    assert ruled["layer"][-1]["mark"]["color"] == "#111827"
    assert list(ruled["datasets"]) == [charts.STEP_RULE_DATA]
    assert rows(ruled, ruled["layer"][-1]) == [{"step": 2}]
    assert len(layered["layer"]) == 1 and "datasets" not in layered


@pytest.mark.parametrize("name", ["tokens_per_s", "hit_rate", "preemptions", "blocks"])
def test_live_spec_draws_what_the_altair_builder_draws(name):
    df = analysis.step_metrics(steps_frame(9))
    rows_in = analysis.block_mix(df) if name == "blocks" else df
    built = (charts.block_mix_chart(rows_in) if name == "blocks"
             else charts.series_chart(rows_in, name)).to_dict()
    live = charts.live_spec(name, rows_in)
    view_keys = ("mark", "encoding", "transform", "title")
    assert {k: live.get(k) for k in view_keys} == {k: built.get(k) for k in view_keys}
    assert live["data"] == {"name": charts.LIVE_DATA}
    assert rows(live) == rows(built)  # same rows, same order, only the drawn columns
    live["datasets"].clear()  # Streamlit edits the specs it is given: the template stays whole
    assert len(rows(charts.live_spec(name, rows_in))) == len(rows(built)) > 0


def test_overlay_chart_colours_each_run():
    both = analysis.stack_runs({"a": analysis.step_metrics(steps_frame(5)),
                                "b": analysis.step_metrics(steps_frame(8))})
    spec = charts.overlay_chart(both, "hit_rate").to_dict()
    assert spec["mark"]["type"] == "line" and spec["title"] == "prefix hit rate (cumulative)"
    enc = encodings(spec)
    assert enc["color"] == ("run", "nominal") and enc["y"] == ("hit_rate", "quantitative")
    drawn = rows(spec)
    assert [r["run"] for r in drawn] == ["a"] * 5 + ["b"] * 8
    assert drawn[-1]["step"] == 8 and drawn[-1]["hit_rate"] == pytest.approx(0.5)


def test_latency_percentiles_from_request_records():
    requests = pd.DataFrame({
        "request_id": [0, 1, 2], "arrival_t": [0.0, 0.0, 1.0], "prompt_tokens": 4,
        "cached_prompt_tokens": 0, "output_tokens": [11, 1, 5],
        "first_token_t": [0.5, 0.25, None], "finish_t": [1.5, 0.25, None],
        "num_preemptions": 0, "finish_reason": "stop"})
    lat = analysis.latencies(requests)
    assert lat["ttft_s"].tolist()[:2] == [0.5, 0.25]
    assert lat["tpot_s"].iloc[0] == pytest.approx(0.1) and np.isnan(lat["tpot_s"].iloc[1])
    table = analysis.latency_percentiles({"a": requests})
    assert table.loc[0, "TPOT p50 (ms)"] == pytest.approx(100.0)
    spec = charts.percentile_chart(table, "TTFT").to_dict()
    assert spec["mark"]["type"] == "bar" and spec["title"] == "TTFT (ms)"
    enc = encodings(spec)
    assert enc["x"] == ("percentile", "nominal") and enc["xOffset"] == ("run", "nominal")
    assert enc["y"] == ("ms", "quantitative")
    drawn = {r["percentile"]: r["ms"] for r in rows(spec)}
    assert list(drawn) == ["p50", "p90", "p99"]
    assert drawn["p50"] == pytest.approx(375.0)  # TTFT 0.5 s and 0.25 s


def test_config_diff_lists_only_differing_nested_fields():
    diff = analysis.config_diff({"a": {"block_size": 16, "workload": {"name": "x", "n": 1}},
                                 "b": {"block_size": 32, "workload": {"name": "x", "n": 1}}})
    assert diff.index.tolist() == ["block_size"]
    assert diff.loc["block_size"].tolist() == ["16", "32"]


def test_request_segments_follow_the_life_cycle():
    events = pd.DataFrame({"step": [0, 1, 2, 3, 5, 6, 0, 4], "t": 0.0,
                           "request_id": [1, 1, 2, 3, 3, 3, 2, 2],
                           "kind": ["arrive", "schedule", "first_token", "preempt", "schedule",
                                    "finish", "arrive", "schedule"]})
    events.loc[events.index[3:6], "request_id"] = 1
    seg = timeline.request_segments(events, last_step=9)
    one = seg[seg["request_id"] == 1]
    assert one["state"].tolist() == ["waiting", "running", "preempted", "running"]
    assert one[["start", "end"]].values.tolist() == [[0, 1], [1, 3], [3, 5], [5, 6]]
    two = seg[seg["request_id"] == 2]
    assert two["state"].tolist() == ["waiting", "running"] and two["end"].iloc[-1] == 9
    spec = timeline.request_timeline_chart(seg, title="request timeline").to_dict()
    assert spec["mark"]["type"] == "bar" and spec["title"] == "request timeline"
    enc = encodings(spec)
    assert enc["x"] == ("start", "quantitative") and enc["x2"][0] == "end"
    assert enc["y"] == ("request_id", "ordinal") and enc["color"] == ("state", "nominal")
    drawn = rows(spec)
    assert len(drawn) == len(seg) == 6
    assert [(r["request_id"], r["state"], r["start"], r["end"]) for r in drawn[:2]] == [
        (1, "waiting", 0, 1), (1, "running", 1, 3)]


STATE = BlockState(ref_counts=[0, 1, 2, 0], block_hashes=[None, "ab", "cd", "ef"],
                   owners=[None, 7, 8, None], free_queue=[3, 0])


def test_block_frame_colours_by_state_and_labels_shared_blocks():
    frame = block_grid.block_frame(STATE)
    cells = frame[frame["first"] == 1].set_index("block_id")
    assert cells["state"].tolist() == ["free", "in use", "in use", "free, cached"]
    assert cells[["x", "y"]].values.tolist() == [[0, 0], [1, 0], [2, 0], [3, 0]]
    assert cells["label"].tolist() == ["", "", "2", ""]
    assert cells.loc[1, "holders"] == "request 7 (last to take it)"  # no holders given
    queue = free_queue.free_queue_frame(STATE)
    assert queue["block_id"].tolist() == [3, 0]
    assert queue["state"].tolist() == ["free, cached", "free"]


@pytest.mark.parametrize(("blocks", "columns"), [(1, 8), (64, 16), (512, 32), (100_000, 64)])
def test_grid_columns_make_a_roughly_two_to_one_grid(blocks, columns):
    assert block_grid.grid_columns(blocks) == columns


def test_block_grid_spec_draws_one_cell_per_block():
    layout = block_grid.plan(4)
    frame = block_grid.block_frame(STATE, layout)
    spec = block_grid_chart.block_grid_spec(frame, layout)
    rects, outline, marks, labels = spec["layer"][:4]  # (then the lane titles)
    assert rects["mark"]["type"] == "rect" and labels["mark"]["type"] == "text"
    enc = encodings(rects)
    assert enc["x"] == ("xa", "quantitative") and enc["y"] == ("ya", "quantitative")
    assert enc["color"] == ("state", "nominal")
    assert encodings(marks)["fill"] == ("change", "nominal")
    assert encodings(labels)["text"] == ("label", "nominal")
    assert rows(spec) == frame.to_dict("records")
    assert spec["autosize"]["type"] == "fit-x" and "width" not in spec  # fits its column
    spec["datasets"]["blocks"] = None  # Streamlit may edit a spec: the template stays whole
    again = block_grid_chart.block_grid_spec(frame, layout)
    assert len(rows(again)) == 4


def test_free_queue_spec_shows_the_head_of_the_queue_in_order():
    spec = free_queue.free_queue_spec(free_queue.free_queue_frame(STATE))
    assert spec["title"] == "Free queue, LRU first"  # the same at every step
    rects = spec["layer"][0]
    assert rects["mark"]["type"] == "rect" and encodings(rects)["color"] == ("state", "nominal")
    assert [(r["position"], r["block_id"], r["state"]) for r in rows(spec)] == [
        (0, 3, "free, cached"), (1, 0, "free")]
    n = 300
    long = BlockState([0] * n, [None] * n, [None] * n, list(range(n)))
    spec = free_queue.free_queue_spec(free_queue.free_queue_frame(long, limit=256))
    assert [r["block_id"] for r in rows(spec)] == list(range(256))
    assert free_queue.free_queue_caption(300, 0) == (
        "Free queue: 300 blocks, 0 of them cached; the first is reused (and evicted, if "
        "cached) next (the first 256 drawn)")


FORM = {"model": "tiny", "device": "cpu", "dtype": "auto", "kv_dtype": "auto", "seed": 0,
        "block_size": 16, "budget_mode": "default", "enable_prefix_caching": True,
        "keyframe_interval": 50, "max_num_seqs": 8, "max_num_batched_tokens": 512,
        "max_model_len": 0, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "ignore_eos": False,
        "workload_kind": "preset", "preset": "mixed", "name": ""}


def test_form_values_become_a_run_config():
    config = config_from_values({**FORM, "budget_mode": "bytes", "kv_budget": "1MiB"})
    assert config.kv_budget_bytes == 2**20 and config.num_blocks is None
    assert config.workload.name == "mixed" and config.max_model_len is None


@pytest.mark.parametrize(("change", "field"), [
    ({"block_size": 24}, "block_size"),
    ({"budget_mode": "bytes", "kv_budget": "lots"}, "kv_budget"),
    ({"budget_mode": "blocks", "num_blocks": 2}, "num_blocks"),
    ({"max_num_batched_tokens": 4}, "max_num_batched_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"workload_kind": "file", "path": None}, "workload.path"),
])
def test_bad_form_values_name_their_field(change, field):
    with pytest.raises(ConfigError) as e:
        config_from_values({**FORM, **change})
    assert e.value.field == field


def test_request_events_get_the_labels_of_their_requests():
    events = pd.DataFrame({"step": [1, 1, 2, 3], "request_id": [0, 1, 0, 2],
                           "kind": ["arrive", "arrive", "finish", "schedule"]})
    requests = pd.DataFrame({"request_id": [0, 1], "label": ["q0", None]})
    labelled = analysis.with_request_labels(events, requests)
    assert labelled["label"].tolist() == ["q0", "", "q0", ""]  # 2 is still running: no record
    assert analysis.with_request_labels(events, requests.iloc[:0])["label"].tolist() == [""] * 4
