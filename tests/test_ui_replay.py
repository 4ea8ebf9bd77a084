"""Replay page under AppTest: the slider moves the block grid, play advances, download works,
every holder of a block is listed, a request's tables are outlined, steps can be typed and
jumped to, the grid aggregates big pools, and a run still being written grows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
from replay_fixtures import many_requests_run, synthetic_run
from streamlit.testing.v1 import AppTest

from engine.config import RunConfig, SamplingConfig, WorkloadSpec
from engine.run import run
from engine.trace import ListSink
from store import RunReader, RunWriter, import_run
from ui import block_grid, block_grid_chart, charts, widgets

ROOT = Path(__file__).resolve().parent.parent
PAGE = "pages/2_Replay.py"


def seed_run(store, model=None, name: str = "seeded", tags=(), **knobs) -> int:
    """A tiny-model run straight through the engine and the store's writer."""
    knobs = {"num_blocks": 24, "workload": WorkloadSpec(
        kind="synthetic", num_requests=6, prompt_len_min=16, prompt_len_max=40,
        output_len_min=4, output_len_max=12, num_prefix_groups=1, shared_prefix_len=24),
        **knobs}
    config = RunConfig(model="tiny", device="cpu", block_size=8, max_model_len=128,
                       keyframe_interval=5, **knobs)
    writer = RunWriter(store, config, name=name, tags=tags)
    writer.close(summary=run(config, writer, model=model).summary.to_dict())
    return writer.run_id


def pressure_knobs() -> dict:
    """Enough requests for 24 blocks that some are preempted and cached blocks evicted."""
    return {"max_num_seqs": 6, "sampling": SamplingConfig(ignore_eos=True),
            "workload": WorkloadSpec(kind="synthetic", num_requests=10, prompt_len_min=16,
                                     prompt_len_max=40, output_len_min=16, output_len_max=40,
                                     num_prefix_groups=2, shared_prefix_len=24)}


def open_page(run_id: int | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
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
    grids = [c.proto for c in at.get("vega_lite_chart")
             if any(d.name == block_grid_chart.GRID_DATA for d in c.proto.datasets)]
    assert len(grids) == 1, len(grids)
    return grids[0]


def grid_rows(at: AppTest) -> list[dict]:
    return named_dataset(grid_of(at), block_grid_chart.GRID_DATA)


def cells(at: AppTest) -> dict[int, dict]:
    """Block id -> its cell (first piece), for a grid of one cell per block."""
    return {r["block_id"]: r for r in grid_rows(at) if r["first"] == 1}


def shown_step(at: AppTest) -> int:
    caption = next(c.value for c in at.caption if "KV blocks after step" in c.value)
    return int(caption.split("KV blocks after step ")[1].split("*")[0])


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
    assert shown_step(at) == 1
    titles = set(charts_by_title(at))
    for expected in ("throughput (tokens/s)", "KV blocks", "prefix hit rate (cumulative)",
                     "evictions (cumulative)", "KV cache usage (%)",
                     "prefix cache per step (tokens)", "tokens per step", "requests by state",
                     "request timeline", "Free queue, LRU first"):
        assert expected in titles, titles
    before = grid_of(at)
    middle = last // 2
    at.slider(key="replay_step").set_value(middle).run()
    assert not at.exception
    after = grid_of(at)
    assert shown_step(at) == middle
    assert after.spec == before.spec  # one spec per run: the browser swaps the data only
    assert [d.data.data for d in after.datasets] != [d.data.data for d in before.datasets]
    # the rule on the time series follows the slider (its step is data, the spec stays put)
    chart = charts_by_title(at)["throughput (tokens/s)"]
    assert json.loads(chart.spec)["layer"][-1]["data"] == {"name": charts.STEP_RULE_DATA}
    assert named_dataset(chart, charts.STEP_RULE_DATA) == [{"step": middle}]
    # over time instead of steps: the x field is t, and the rule sits at the step's time
    at.radio(key="replay_x").set_value("t").run()
    chart = charts_by_title(at)["throughput (tokens/s)"]
    assert json.loads(chart.spec)["layer"][0]["encoding"]["x"]["field"] == "t"
    t = float(RunReader(store).steps(run_id).set_index("step").loc[middle, "t"])
    assert named_dataset(chart, charts.STEP_RULE_DATA) == [{"t": t}]


def test_a_run_with_two_kv_cache_groups_draws_one_lane_per_group(store, tiny_model):
    run_id = seed_run(store, tiny_model, policy="0:full; 1:full", num_blocks=48)
    at = open_page(run_id)
    at.slider(key="replay_step").set_value(RunReader(store).last_step(run_id) // 2).run()
    rows = grid_rows(at)
    lanes = [r["lane"] for r in rows if r["block_id"] < 0]
    assert [lane.rsplit(" · ", 1)[0] for lane in lanes] == [
        "group 0 · layers 0", "group 1 · layers 1", "free, no group"]
    blocks = [r for r in rows if r["block_id"] >= 0 and r["first"] == 1]
    assert sorted(r["block_id"] for r in blocks) == list(range(48))  # every block once
    assert {r["group"] for r in blocks} <= {"0", "1", "—"}


def test_every_holder_of_a_shared_block_is_listed_with_its_tokens(store, tiny_model):
    run_id = seed_run(store, tiny_model)
    steps = RunReader(store).steps(run_id)
    sharing = int(steps.loc[steps["prefix_hit_tokens"] > 0, "step"].iloc[0])
    at = open_page(run_id)
    at.slider(key="replay_step").set_value(sharing).run()
    shared = [c for c in cells(at).values() if c["ref_count"] > 1]
    assert shared, "no block is shared at the first prefix hit"
    for cell in shared:
        names = cell["holders"].removeprefix("requests ").split(", ")
        assert len(names) == cell["ref_count"], cell
        assert cell["tokens"].endswith(")") and cell["hash"] != "—" and cell["parent"]
    first = min(shared, key=lambda c: c["tokens"])
    assert first["tokens"] == "0-7 (slot 0)" and first["parent"].startswith("none")
    # the inspector: every holder in a table, then a request's tables slot by slot
    at.number_input(key="replay_block").set_value(first["block_id"]).run()
    assert not at.exception
    holders = next(d.value for d in at.dataframe if "slot" in d.value.columns
                   and "request" in d.value.columns)
    assert len(holders) == first["ref_count"] and set(holders["slot"]) == {0}
    request = int(holders["request"].iloc[0])
    at.number_input(key="replay_request").set_value(request).run()
    table = next(d.value for d in at.dataframe if "shared" in d.value.columns)
    assert table["slot"].tolist() == list(range(len(table)))
    assert bool(table["shared"].iloc[0])
    outlined = {c["block_id"] for c in cells(at).values() if c["hl"] == 1}
    assert outlined == set(table["block"].dropna().astype(int))


def test_the_steps_changes_are_marked_in_the_grid(store, tiny_model):
    run_id = seed_run(store, tiny_model, **pressure_knobs())
    reader = RunReader(store)
    events = reader.block_events(run_id)
    evicting = int(events.loc[events["kind"] == "evict", "step"].iloc[0])
    at = open_page(run_id)
    at.slider(key="replay_step").set_value(evicting).run()
    marked = {b: c for b, c in cells(at).items() if c["changed"]}
    in_step = events.loc[events["step"] == evicting]
    assert set(marked) == set(in_step["block_id"])
    evicted = set(in_step.loc[in_step["kind"] == "evict", "block_id"])
    assert all(marked[b]["change"] == "evicted" and "evicted" in marked[b]["change_text"]
               for b in evicted)


def test_steps_can_be_typed_and_jumped_to(store, tiny_model):
    run_id = seed_run(store, tiny_model, **pressure_knobs())
    steps = RunReader(store).steps(run_id)
    preempted = steps.loc[steps["num_preempted"] > 0, "step"].tolist()
    evicted = steps.loc[steps["num_evicted"] > 0, "step"].tolist()
    assert preempted and evicted
    at = open_page(run_id)
    at.number_input(key="replay_step_typed").set_value(3).run()
    assert at.slider(key="replay_step").value == 3 and shown_step(at) == 3
    at.selectbox(key="replay_jump_kind").set_value("preemption").run()
    at.button(key="replay_next").click().run()
    assert at.slider(key="replay_step").value == next(s for s in preempted if s > 3)
    at.selectbox(key="replay_jump_kind").set_value("eviction").run()
    at.slider(key="replay_step").set_value(int(steps["step"].max())).run()
    at.button(key="replay_prev").click().run()
    assert at.slider(key="replay_step").value == evicted[-1]
    assert at.number_input(key="replay_step_typed").value == evicted[-1]


def test_the_request_table_lists_every_request_and_rejections(store):
    run_id, _ = many_requests_run(store, 60, rejected_every=20)
    at = open_page(run_id)
    table = next(d.value for d in at.dataframe if "finish or rejection reason" in d.value.columns)
    assert len(table) == 60
    rejected = table[table["finish or rejection reason"].str.startswith("rejected")]
    assert rejected["request"].tolist() == [19, 39, 59]
    for column in ("prompt tokens", "cached prompt tokens", "output tokens", "TTFT (ms)",
                   "mean TPOT (ms)", "preemptions"):
        assert column in table.columns
    assert table.loc[table["request"] == 0, "cached prompt tokens"].iloc[0] == 16
    # more requests than a timeline page: it pages, and says how many there are
    assert "request timeline: requests 1-50 of 60" in set(charts_by_title(at))
    at.number_input(key="replay_page").set_value(2).run()
    assert "request timeline: requests 51-60 of 60" in set(charts_by_title(at))


def test_the_demo_opens_at_its_story(store, tiny_model):
    run_id = seed_run(store, tiny_model, tags=("demo",), **pressure_knobs())
    steps = RunReader(store).steps(run_id)
    first_preemption = int(steps.loc[steps["num_preempted"] > 0, "step"].iloc[0])
    at = open_page(run_id)
    assert at.slider(key="replay_step").value == first_preemption
    assert any(i.value.startswith(f"Step {first_preemption}: the cache ran out of blocks")
               for i in at.info)


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


def test_a_run_can_be_renamed_and_deleted_after_a_confirmation(store, tiny_model):
    keep = seed_run(store, tiny_model, name="keep")
    gone = seed_run(store, tiny_model, name="old name")
    at = open_page(gone)
    at.text_input(key=f"replay_manage_name_{gone}").set_value("new name").run()
    at.button(key="replay_manage_rename").click().run()
    assert not at.exception
    assert RunReader(store).run_info(gone).name == "new name"
    at.button(key="replay_manage_delete").click().run()
    assert any("cannot be undone" in w.value for w in at.warning)
    at.button(key="replay_manage_delete_no").click().run()
    assert len(RunReader(store).list_runs()) == 2 and not at.warning
    at.button(key="replay_manage_delete").click().run()
    at.button(key="replay_manage_delete_yes").click().run()
    assert not at.exception
    assert RunReader(store).list_runs()["run_id"].tolist() == [keep]
    assert at.selectbox(key="replay_run").value == keep


def store_dir(store) -> Path:
    return Path(store.engine.url.database).parent


def test_jumping_to_any_step_of_a_10000_step_run_answers_within_a_second(store):
    run_id, last = synthetic_run(store, num_steps=10_000, num_blocks=256)
    at = open_page(run_id)
    at.slider(key="replay_step").set_value(2).run()  # warm the per-run caches
    at.slider(key="replay_step").set_value(last).run()  # and the holders' checkpoints
    timings = []
    for step in (last, 1, last // 2, last - 7):
        start = time.perf_counter()
        at.slider(key="replay_step").set_value(step).run()
        timings.append(time.perf_counter() - start)
    assert max(timings) < 1.0, timings
    assert shown_step(at) == last - 7
    assert len(RunReader(store).block_state_at(run_id, last - 7).ref_counts) == 256


def test_a_500000_block_grid_aggregates_and_zooms(store):
    run_id, last = synthetic_run(store, num_steps=30, num_blocks=500_000, keyframe_interval=10)
    at = open_page(run_id)
    timings = []
    for step in (last, last // 2, last - 1):
        start = time.perf_counter()
        at.slider(key="replay_step").set_value(step).run()
        timings.append(time.perf_counter() - start)
    assert not at.exception
    assert max(timings) < 4.0, timings  # the target is 2 s; the box is shared
    rows = grid_rows(at)
    first_cells = [r for r in rows if r["first"] == 1]
    assert len(first_cells) <= block_grid.MAX_CELLS
    assert sum(r["blocks"] for r in first_cells) == 500_000
    assert sum(r["in_use"] for r in first_cells) == int(
        RunReader(store).steps(run_id).set_index("step").loc[last - 1, "blocks_used"])
    at.slider(key="replay_zoom").set_value((1000, 1999)).run()
    zoomed = cells(at)
    assert sorted(zoomed) == list(range(1000, 2000))  # one cell per block again
    assert all(c["blocks"] == 1 for c in zoomed.values())


def test_a_20000_request_run_opens_quickly(store):
    run_id, _ = many_requests_run(store, 20_000)
    open_page(seed_small(store))  # the page's imports, as on a running server
    start = time.perf_counter()
    at = open_page(run_id)
    elapsed = time.perf_counter() - start
    assert elapsed < 6.0, elapsed  # the target is 3 s; the box is shared
    titles = set(charts_by_title(at))
    assert "request timeline: requests 1-50 of 20,000" in titles, titles
    print(f"\n20,000-request run opened in {elapsed:.2f} s")


def seed_small(store) -> int:
    return synthetic_run(store, num_steps=20, num_blocks=64, name="small")[0]


def test_the_replay_of_a_running_run_grows(store, tiny_model):
    config = RunConfig(model="tiny", device="cpu", block_size=8, num_blocks=48,
                       max_model_len=128, keyframe_interval=5,
                       sampling=SamplingConfig(ignore_eos=True),
                       workload=WorkloadSpec(kind="synthetic", num_requests=4,
                                             output_len_min=30, output_len_max=30))
    sink = ListSink()
    run(config, sink, model=tiny_model)
    writer = RunWriter(store, config, name="still going")
    writer.record_keyframe(sink.keyframes[0])
    half = len(sink.steps) // 2

    def write(steps):
        for record in steps:
            step = record.step
            writer.record_step(record, [e for e in sink.block_events if e.step == step],
                               [e for e in sink.request_events if e.step == step])
            for k in sink.keyframes:
                if k.step == step:
                    writer.record_keyframe(k)
        writer.flush()

    write(sink.steps[:half])
    at = open_page(writer.run_id)
    assert at.slider(key="replay_step").max == half
    assert any(f"Recording: {half} steps so far" in c.value for c in at.caption)
    at.toggle(key="replay_follow").set_value(True).run()
    assert at.slider(key="replay_step").value == half
    write(sink.steps[half:])
    time.sleep(5.1)  # the runs list is cached for 5 s; the poll clears it when it sees more
    at.run()  # the poll's tick: it finds more steps and reruns the page
    at.run()
    assert not at.exception
    assert at.slider(key="replay_step").max == len(sink.steps)
    assert at.slider(key="replay_step").value == len(sink.steps)  # following the head
    writer.close(summary={})
