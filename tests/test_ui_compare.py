"""Compare page under AppTest: overlaid charts, latency percentiles, the differing settings."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine.config import RunConfig, WorkloadSpec
from engine.run import run
from store import RunWriter

ROOT = Path(__file__).resolve().parent.parent
PAGE = "pages/3_Compare.py"


def seed_run(store, model, name: str, **knobs) -> int:
    config = RunConfig(
        model="tiny", device="cpu", max_model_len=128, keyframe_interval=5,
        workload=WorkloadSpec(kind="synthetic", num_requests=5, prompt_len_min=16,
                              prompt_len_max=32, output_len_min=4, output_len_max=8,
                              num_prefix_groups=1, shared_prefix_len=24),
        **{"block_size": 8, "num_blocks": 24, **knobs})
    writer = RunWriter(store, config, name=name)
    writer.close(summary=run(config, writer, model=model).summary.to_dict())
    return writer.run_id


def open_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30)
    at.switch_page(PAGE).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_one_run_is_not_enough(store, tiny_model):
    seed_run(store, tiny_model, "alone")
    at = open_page()
    assert any("at least two" in i.value for i in at.info)


def test_two_runs_show_their_differing_settings_and_overlays(store, tiny_model):
    a = seed_run(store, tiny_model, "cached")
    b = seed_run(store, tiny_model, "uncached", enable_prefix_caching=False, block_size=16,
                 num_blocks=16)
    at = open_page()
    assert sorted(at.multiselect(key="compare_runs").value) == [a, b]
    diff = at.dataframe[0].value
    assert sorted(diff.index) == ["block_size", "enable_prefix_caching", "num_blocks"]
    assert diff.loc["enable_prefix_caching"].tolist() == ["False", "True"]  # newest first
    titles = [json.loads(c.proto.spec)["title"] for c in at.get("vega_lite_chart")]
    for expected in ("throughput (tokens/s)", "blocks in use", "prefix hit rate (cumulative)",
                     "evictions (cumulative)", "preemptions (cumulative)", "TTFT (ms)",
                     "TPOT (ms)"):
        assert expected in titles, titles
    latency = at.dataframe[1].value
    assert len(latency) == 2 and latency["TTFT p50 (ms)"].notna().all()
    assert {"TTFT p99 (ms)", "TPOT p90 (ms)"} <= set(latency.columns)


def test_a_third_run_can_be_added(store, tiny_model):
    runs = [seed_run(store, tiny_model, f"run {i}", seed=i) for i in range(3)]
    at = open_page()
    at.multiselect(key="compare_runs").set_value(runs).run()
    assert not at.exception
    diff = at.dataframe[0].value
    assert list(diff.index) == ["seed"] and diff.shape[1] == 3
    overlay = next(c for c in at.get("vega_lite_chart")
                   if json.loads(c.proto.spec)["title"] == "blocks in use")
    assert overlay.proto.datasets or json.loads(overlay.proto.spec).get("datasets")
