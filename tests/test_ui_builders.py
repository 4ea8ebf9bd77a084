"""The chart builders and frame shapers in ui/ (no Streamlit script runs here)."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import pytest

from engine.config import ConfigError
from engine.trace import BlockState
from ui import analysis, block_grid, charts, timeline
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
    assert isinstance(charts.percentile_chart(table, "TTFT").to_dict(), dict)


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
    chart = timeline.request_timeline_chart(seg, step=4)
    assert isinstance(chart, alt.LayerChart)


def test_block_frame_colours_by_state_and_labels_shared_blocks():
    state = BlockState(ref_counts=[0, 1, 2, 0], block_hashes=[None, "ab", "cd", "ef"],
                       owners=[None, 7, 8, None], free_queue=[3, 0])
    frame = block_grid.block_frame(state, columns=2)
    assert frame["state"].tolist() == ["free", "in use", "in use", "free, cached"]
    assert frame[["x", "y"]].values.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert frame["label"].tolist() == ["", "", "2", ""]
    assert frame["owner"].tolist()[1] == "request 7"
    queue = block_grid.free_queue_frame(state)
    assert queue["block_id"].tolist() == [3, 0]
    assert queue["state"].tolist() == ["free, cached", "free"]
    spec = block_grid.block_grid_chart(frame).to_dict()
    assert len(spec["datasets"][next(iter(spec["datasets"]))]) == 4
    block_grid.free_queue_chart(queue).to_dict()


def test_series_charts_carry_a_rule_at_the_current_step():
    df = analysis.step_metrics(steps_frame(20))
    spec = charts.series_chart(df, "tokens_per_s", step=7).to_dict()
    assert spec["layer"][1]["mark"]["type"] == "rule"
    assert isinstance(charts.block_mix_chart(analysis.block_mix(df), step=3).to_dict(), dict)
    both = analysis.compare_frame({"a": steps_frame(5), "b": steps_frame(8)})
    assert set(both["run"]) == {"a", "b"}
    assert isinstance(charts.overlay_chart(both, "hit_rate").to_dict(), dict)


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
