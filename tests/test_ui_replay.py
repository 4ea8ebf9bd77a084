"""Replay page under AppTest: the slider moves the block grid, play advances, download works."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pyarrow as pa
from streamlit.testing.v1 import AppTest

from engine.config import RunConfig, WorkloadSpec
from engine.run import run
from engine.trace import (
    BlockEvent,
    BlockState,
    RequestEvent,
    RequestRecord,
    StepRecord,
    apply_block_event,
)
from store import RunReader, RunWriter, import_run
from ui import charts, widgets

ROOT = Path(__file__).resolve().parent.parent
PAGE = "pages/2_Replay.py"


def seed_run(store, model=None, name: str = "seeded", **knobs) -> int:
    """A tiny-model run straight through the engine and the store's writer."""
    knobs = {"num_blocks": 24, **knobs}
    config = RunConfig(
        model="tiny", device="cpu", block_size=8, max_model_len=128,
        keyframe_interval=5, workload=WorkloadSpec(
            kind="synthetic", num_requests=6, prompt_len_min=16, prompt_len_max=40,
            output_len_min=4, output_len_max=12, num_prefix_groups=1, shared_prefix_len=24),
        **knobs)
    writer = RunWriter(store, config, name=name)
    writer.close(summary=run(config, writer, model=model).summary.to_dict())
    return writer.run_id


def open_page(run_id: int | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30)
    at.switch_page(PAGE)
    if run_id is not None:
        at.query_params["run"] = str(run_id)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts_by_title(at: AppTest) -> dict[str, object]:
    out = {}
    for chart in at.get("vega_lite_chart"):
        title = json.loads(chart.proto.spec).get("title", "")
        out[title if isinstance(title, str) else title.get("text", "")] = chart.proto
    return out


def named_dataset(proto, name: str) -> list[dict]:
    """A chart's named dataset, as Streamlit sent it (Arrow IPC bytes)."""
    data = next(d.data.data for d in proto.datasets if d.name == name)
    return pa.ipc.open_stream(data).read_all().to_pylist()


def grid_of(at: AppTest):
    grids = [p for t, p in charts_by_title(at).items() if t.startswith("KV blocks after step")]
    assert len(grids) == 1, list(charts_by_title(at))
    return grids[0]


def test_empty_database_points_to_the_demo(store):
    at = open_page()
    assert any("No runs stored yet" in i.value for i in at.info)


def test_the_slider_changes_the_block_grid(store, tiny_model):
    run_id = seed_run(store, tiny_model)
    last = RunReader(store).last_step(run_id)
    at = open_page(run_id)
    assert at.selectbox(key="replay_run").value == run_id
    slider = at.slider(key="replay_step")
    assert (slider.min, slider.max, slider.value) == (1, last, 1)
    titles = set(charts_by_title(at))
    for expected in ("KV blocks after step 1", "throughput (tokens/s)", "KV blocks",
                     "prefix hit rate (cumulative)", "evictions (cumulative)",
                     "request timeline"):
        assert expected in titles, titles
    assert any(t.startswith("Free queue") for t in titles)
    before = grid_of(at)
    middle = last // 2
    at.slider(key="replay_step").set_value(middle).run()
    assert not at.exception
    after = grid_of(at)
    assert json.loads(after.spec)["title"] == f"KV blocks after step {middle}"
    assert [d.data.data for d in after.datasets] != [d.data.data for d in before.datasets]
    # the rule on the time series follows the slider (its step is data, the spec stays put)
    chart = charts_by_title(at)["throughput (tokens/s)"]
    assert json.loads(chart.spec)["layer"][-1]["data"] == {"name": charts.STEP_RULE_DATA}
    assert named_dataset(chart, charts.STEP_RULE_DATA) == [{"step": middle}]


def test_a_run_with_two_kv_cache_groups_draws_one_lane_per_group(store, tiny_model):
    run_id = seed_run(store, tiny_model, policy="0:full; 1:full", num_blocks=48)
    at = open_page(run_id)
    at.slider(key="replay_step").set_value(RunReader(store).last_step(run_id) // 2).run()
    rows = _grid_rows(grid_of(at))
    lanes = [r["lane"] for r in rows if r["block_id"] < 0]
    assert [lane.rsplit(" · ", 1)[0] for lane in lanes] == [
        "group 0 · layers 0", "group 1 · layers 1", "free, no group"]
    blocks = [r for r in rows if r["block_id"] >= 0]
    assert sorted(r["block_id"] for r in blocks) == list(range(48))  # every block once
    assert {r["group"] for r in blocks} <= {"0", "1", "—"}


def _grid_rows(proto) -> list[dict]:
    """The grid's data rows: Streamlit sends the spec's named dataset as Arrow IPC bytes."""
    (dataset,) = [d for d in proto.datasets if d.name == "blocks"]
    return pa.ipc.open_stream(dataset.data.data).read_all().to_pylist()


def test_play_advances_the_step_and_stops_at_the_end(store, tiny_model):
    run_id = seed_run(store, tiny_model)
    last = RunReader(store).last_step(run_id)
    at = open_page(run_id)
    at.button(key="replay_play").click().run()
    assert at.session_state["replay_playing"]
    first = at.session_state["replay_step"]
    at.run()  # AppTest has no timer: a rerun stands in for the fragment's tick
    assert at.session_state["replay_step"] > first
    at.slider(key="replay_step").set_value(last).run()
    at.run()
    assert not at.session_state["replay_playing"]


def test_download_button_and_run_switching(store, tiny_model):
    first = seed_run(store, tiny_model, name="one")
    second = seed_run(store, tiny_model, name="two", enable_prefix_caching=False)
    at = open_page(first)
    assert at.get("download_button"), "no download button"
    at.selectbox(key="replay_run").set_value(second).run()
    assert not at.exception
    assert at.query_params["run"] == [str(second)] or at.query_params["run"] == str(second)
    assert at.slider(key="replay_step").value == 1
    # what the button serves: the store's export file, which imports back
    data = widgets._export_bytes(second)
    assert data[:2] == b"PK"
    path = store_dir(store) / "download.kvtrace.zip"
    path.write_bytes(data)
    copy = import_run(store, path)
    assert RunReader(store).run_info(copy).config.enable_prefix_caching is False


def store_dir(store) -> Path:
    return Path(store.engine.url.database).parent


def test_jumping_to_any_step_of_a_10000_step_run_answers_within_a_second(store):
    run_id, last = synthetic_run(store, num_steps=10_000, num_blocks=256)
    at = open_page(run_id)
    at.slider(key="replay_step").set_value(2).run()  # warm the per-run caches
    timings = []
    for step in (last, 1, last // 2):
        start = time.perf_counter()
        at.slider(key="replay_step").set_value(step).run()
        timings.append(time.perf_counter() - start)
    assert max(timings) < 1.0, timings
    state = RunReader(store).block_state_at(run_id, last // 2)
    shown = json.loads(grid_of(at).spec)["title"]
    assert shown == f"KV blocks after step {last // 2}" and len(state.ref_counts) == 256


def synthetic_run(store, num_steps: int, num_blocks: int) -> tuple[int, int]:
    """A long trace without the engine (seconds, not minutes): requests take a free block from
    the queue's head, some blocks get hashed, used blocks are freed to the tail."""
    rng = random.Random(0)
    config = RunConfig(model="tiny", device="cpu", num_blocks=num_blocks, max_model_len=256,
                       keyframe_interval=50)
    writer = RunWriter(store, config, name="synthetic 10k")
    state = BlockState([0] * num_blocks, [None] * num_blocks, [None] * num_blocks,
                       list(range(num_blocks)))
    writer.record_keyframe(state.to_keyframe(0))
    for step in range(1, num_steps + 1):
        rid, t = step % 32, step * 0.01
        events, request_events = [], [RequestEvent(step, t, rid, "schedule")]
        if state.free_queue and rng.random() < 0.55:
            b = state.free_queue[0]
            if state.block_hashes[b] is not None:
                events.append(BlockEvent(step, b, "evict", None, 0, state.block_hashes[b]))
            events.append(BlockEvent(step, b, "allocate", rid, 1))
            if rng.random() < 0.5:
                events.append(BlockEvent(step, b, "cache", rid, 1, f"{step:016x}"))
        else:
            used = [b for b, r in enumerate(state.ref_counts) if r > 0]
            if used:
                events.append(BlockEvent(step, rng.choice(used), "free", None, 0))
        for event in events:
            apply_block_event(state, event)
        used = sum(r > 0 for r in state.ref_counts)
        cached = sum(state.block_hashes[b] is not None for b in state.free_queue)
        writer.record_step(StepRecord(
            step, t, 0.01, 4, 1, 0, 4, 4, 0, used, num_blocks - used, cached, 8, 4,
            sum(e.kind == "evict" for e in events), used * 1024, num_blocks * 1024),
            events, request_events)
        if step % 50 == 0:
            writer.record_keyframe(state.to_keyframe(step))
    for rid in range(32):
        writer.record_request(RequestRecord(rid, 0.0, 16, 0, 8, 0.1, 1.0, 0, "length"))
    writer.close(summary={"steps": num_steps})
    return writer.run_id, num_steps
