"""The pure builders behind the Replay, Experiment and Compare views (no Streamlit script runs
here): the aggregating block grid, its marks and inspector columns, navigation, the request
table and timeline pages, settings as chosen, distinct run colours, numbers for people."""

from __future__ import annotations

import random
import time

import numpy as np
import pandas as pd
import pytest

from engine.config import RunConfig, WorkloadSpec
from engine.trace import BlockState
from ui import analysis, block_grid, block_grid_chart, charts, timeline
from ui import format as fmt
from ui.holders import Event, Holders


def random_state(n: int, seed: int = 0) -> BlockState:
    rng = random.Random(seed)
    ref = [rng.choice([0, 0, 1, 1, 2]) for _ in range(n)]
    hashes = [f"{i:016x}" if rng.random() < 0.5 else None for i in range(n)]
    return BlockState(ref, hashes, [7 if r else None for r in ref],
                      [b for b in range(n) if ref[b] == 0])


@pytest.mark.parametrize(("blocks", "per_cell", "columns"), [
    (64, 1, 16), (1024, 1, 64), (2048, 1, 64), (100_000, 49, 64), (500_000, 245, 64)])
def test_the_grid_aggregates_past_its_cell_budget(blocks, per_cell, columns):
    layout = block_grid.plan(blocks)
    assert (layout.blocks_per_cell, layout.columns) == (per_cell, columns)
    assert layout.rows * layout.columns >= -(-blocks // per_cell)
    assert layout.height_px <= 32 * block_grid.CELL_HEIGHT_PX[1]
    zoomed = block_grid.plan(blocks, zoom=(10, 1009))
    assert (zoomed.blocks_per_cell, zoomed.lo, zoomed.hi) == (1, 10, min(1009, blocks - 1))


def test_an_aggregated_cell_is_split_by_the_share_of_each_state():
    state = random_state(100_000)
    layout = block_grid.plan(100_000)
    frame = block_grid.block_frame(state, layout)
    firsts = frame[frame["first"] == 1]
    assert len(firsts) == -(-100_000 // layout.blocks_per_cell) <= block_grid.MAX_CELLS
    used = sum(r > 0 for r in state.ref_counts)
    cached = sum(r == 0 and h is not None for r, h in zip(state.ref_counts, state.block_hashes,
                                                          strict=True))
    assert (firsts["in_use"].sum(), firsts["cached"].sum()) == (used, cached)
    assert firsts["blocks"].sum() == 100_000
    one = frame[(frame["x"] == 0) & (frame["y"] == 0)].set_index("state")
    share = one["yb"] - one["ya"]
    inner = 1 - 2 * 0.08
    assert share.sum() == pytest.approx(inner)
    assert share["in use"] == pytest.approx(inner * one["in_use"].iloc[0] / one["blocks"].iloc[0])
    assert (one["block_id"].iloc[0], one["last_block"].iloc[0]) == (0, layout.blocks_per_cell - 1)


def test_a_500000_block_grid_builds_well_within_its_budget():
    state = random_state(500_000)
    layout = block_grid.plan(500_000)
    block_grid_chart.block_grid_spec(block_grid.block_frame(state, layout), layout)  # the template
    start = time.perf_counter()
    frame = block_grid.block_frame(state, layout)
    spec = block_grid_chart.block_grid_spec(frame, layout)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed  # ~0.1 s here; the page adds the store's share
    assert spec["datasets"][block_grid_chart.GRID_DATA].num_rows == len(frame) < 4 * 2048


def test_changed_blocks_are_marked_by_their_most_telling_change():
    state = random_state(40)
    events = pd.DataFrame({"step": 3, "block_id": [1, 1, 1, 2, 5],
                           "kind": ["evict", "allocate", "cache", "free", "drop"],
                           "reason": [None, None, None, None, "out of window"]})
    frame = block_grid.block_frame(state, step_events=events)
    cells = frame[frame["first"] == 1].set_index("block_id")
    assert cells.loc[1, "change"] == "evicted"
    assert cells.loc[1, "change_text"] == "evicted, allocated, cached"
    assert cells.loc[2, "change"] == "freed"
    assert cells.loc[5, "change_text"] == "dropped (out of window)"
    assert cells["changed"].sum() == 3
    agg = block_grid.block_frame(state, block_grid.plan(40, zoom=None), step_events=events)
    assert agg["changed"].max() == 1


def test_cells_name_every_holder_their_tokens_and_the_chain():
    holders = Holders()
    for e in [Event(1, 4, "allocate", 0, None, 0), Event(1, 4, "cache", 0, "aa", 0),
              Event(1, 9, "allocate", 0, None, 0), Event(1, 9, "cache", 0, "bb", 0),
              Event(2, 4, "touch", 1, "aa", 0), Event(2, 9, "touch", 1, "bb", 0),
              Event(2, 6, "allocate", 1, None, 0)]:
        holders.apply(e)
    ref = [0] * 12
    ref[4], ref[9], ref[6] = 2, 2, 1
    hashes = [None] * 12
    hashes[4], hashes[9] = "aa", "bb"
    state = BlockState(ref, hashes, [None] * 12, [b for b in range(12) if not ref[b]])
    frame = block_grid.block_frame(state, holders=holders, highlight=1, block_size=16,
                                   token_text=lambda r, i: f"r{r} slot {i}")
    cells = frame[frame["first"] == 1].set_index("block_id")
    assert cells.loc[9, "holders"] == "requests 0, 1"
    assert cells.loc[9, "tokens"] == "16-31 (slot 1)" and cells.loc[9, "text"] == "r0 slot 1"
    assert cells.loc[9, "parent"] == "aa" and cells.loc[4, "parent"].startswith("none")
    assert cells.loc[6, "parent"] == "bb"  # an unhashed block: its slot's predecessor
    assert cells.loc[6, "holders"] == "request 1" and cells.loc[6, "tokens"] == "32-47 (slot 2)"
    assert set(cells.index[cells["hl"] == 1]) == {4, 6, 9}
    assert cells.loc[0, "holders"] == "" and cells.loc[0, "text"] == ""


def test_lanes_of_an_aggregated_grid_keep_their_groups():
    n = 10_000
    state = random_state(n)
    state.groups = [None if r == 0 and h is None else (b % 2)
                    for b, (r, h) in enumerate(zip(state.ref_counts, state.block_hashes,
                                                   strict=True))]
    layout = block_grid.plan(n, num_lanes=2, zoom=None)
    frame = block_grid.block_frame(state, layout, group_labels={0: "layers 0", 1: "layers 1"})
    lanes = frame.loc[frame["block_id"] < 0, "lane"].tolist()
    assert [lane.split(" · ")[0] for lane in lanes] == ["group 0", "group 1", "free, no group"]
    assert frame.loc[frame["first"] == 1, "blocks"].sum() == n
    assert frame["y"].max() < layout.rows  # the layout holds every lane


def test_steps_to_jump_to_and_the_story_of_a_run():
    steps = pd.DataFrame({"step": [1, 2, 3, 4, 5, 6], "num_preempted": [0, 0, 1, 0, 1, 0],
                          "num_evicted": [0, 1, 0, 0, 0, 2],
                          "prefix_hit_tokens": [0, 16, 0, 0, 0, 0]})
    jumps = analysis.jump_steps(steps)
    assert jumps["preemption"].tolist() == [3, 5] and jumps["eviction"].tolist() == [2, 6]
    assert analysis.neighbour(jumps["preemption"], 3, forward=True) == 5
    assert analysis.neighbour(jumps["preemption"], 3, forward=False) is None
    assert analysis.neighbour(jumps["eviction"], 4, forward=False) == 2
    events = pd.DataFrame({"step": [3], "request_id": [7], "kind": ["preempt"], "t": 0.0})
    step, line = analysis.story(steps, events)
    assert step == 3 and line.startswith("Step 3: the cache ran out of blocks, so request 7")
    calm = steps.assign(num_preempted=0)
    assert analysis.story(calm, events)[0] == 2
    assert analysis.story(calm.assign(num_evicted=0, prefix_hit_tokens=0), events) is None


def test_per_step_series_and_kv_usage():
    steps = pd.DataFrame({"step": [1, 2], "t": [0.5, 1.0], "duration_s": 0.5,
                          "num_generated_tokens": 1, "prefix_query_tokens": [32, 0],
                          "prefix_hit_tokens": [16, 0], "num_evicted": 0, "num_preempted": 0,
                          "kv_bytes_used": 0, "blocks_used": [30, 64], "blocks_free": [34, 0],
                          "num_prefill_tokens": [32, 0], "num_decode_tokens": [0, 2]})
    df = analysis.step_metrics(steps)
    assert df["kv_usage_pct"].tolist() == pytest.approx([100 * 30 / 64, 100.0])
    long = analysis.per_step_long(steps, "prefix_per_step")
    assert long.loc[long["series"] == "hit", "value"].tolist() == [16, 0]
    spec = charts.per_step_chart(analysis.per_step_long(steps, "tokens_per_step"),
                                 "tokens per step", stacked=True, x="t").to_dict()
    assert spec["mark"]["type"] == "area" and spec["encoding"]["x"]["field"] == "t"
    assert spec["encoding"]["y"]["stack"] == "zero"


def test_the_request_table_reads_like_a_person_would_ask():
    requests = pd.DataFrame({
        "request_id": [1, 0], "arrival_t": [0.0, 0.0], "prompt_tokens": [40, 9000],
        "cached_prompt_tokens": [16, 0], "output_tokens": [11, 0],
        "first_token_t": [0.5, None], "finish_t": [1.5, 0.0], "num_preemptions": [1, 0],
        "finish_reason": ["length", "rejected: longer than max_model_len"],
        "label": ["b", "a"]})
    table = analysis.request_table(requests)
    assert table["request"].tolist() == [0, 1]
    assert table.columns.tolist() == [*analysis.REQUEST_TABLE_COLUMNS.values(), "label"]
    assert table.loc[1, "TTFT (ms)"] == pytest.approx(500.0)
    assert table.loc[1, "mean TPOT (ms)"] == pytest.approx(100.0)
    assert table.loc[0, "finish or rejection reason"].startswith("rejected")


def test_settings_that_differ_are_the_ones_a_person_chose():
    base = RunConfig(model="tiny", num_blocks=64)
    upload = base.replace(workload=WorkloadSpec(
        kind="file", path="/srv/kvlab/data/uploads/0123456789abcdef-chats.jsonl"))
    synthetic = base.replace(workload=WorkloadSpec(kind="synthetic", num_requests=9))
    diff = analysis.config_diff({"a": upload.to_dict(), "b": synthetic.to_dict(),
                                 "c": base.to_dict()})
    assert diff.loc["workload.file", "a"] == "chats.jsonl"
    assert not any("/srv" in str(v) for v in diff.to_numpy().ravel())
    assert "workload.path" not in diff.index
    assert diff.loc["workload.num_requests"].tolist() == ["—", "9", "—"]
    assert diff.loc["workload.name"].tolist() == ["—", "—", "shared-prefix"]
    assert diff.loc["workload.kind"].tolist() == ["file", "synthetic", "preset"]


def test_the_timeline_pages_and_counts_20000_requests_quickly():
    n = 20_000
    rid = np.repeat(np.arange(n), 4)
    step = np.column_stack([np.arange(n) // 8, np.arange(n) // 8 + 1, np.arange(n) // 8 + 2,
                            np.arange(n) // 8 + 3]).ravel()
    kinds = np.tile(["arrive", "schedule", "first_token", "finish"], n)
    events = pd.DataFrame({"step": step, "t": 0.0, "request_id": rid, "kind": kinds})
    start = time.perf_counter()
    seg = timeline.request_segments(events, last_step=int(step.max()))
    counts = timeline.state_counts(seg, int(step.max()))
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    assert len(seg) == 2 * n and timeline.num_pages(seg) == n // timeline.PAGE_SIZE
    shown, first, last = timeline.page_of(seg, 3)
    assert (first, last) == (101, 150) and shown["request_id"].nunique() == 50
    at_10 = counts[counts["step"] == 10].set_index("state")["requests"]
    assert at_10["running"] == 16 and at_10["waiting"] == 8  # 8 arrive a step, 2 steps each


def test_runs_get_distinct_colours_and_full_names_in_legends():
    names = [f"#{i} a very long run name that would be cut off at 320 pixels, {i}"
             for i in range(8)]
    colour = charts.run_colours(names).to_dict()
    assert colour["scale"]["domain"] == names
    assert len(set(colour["scale"]["range"])) == 8
    assert colour["legend"]["labelLimit"] == 0


@pytest.mark.parametrize(("fn", "value", "text"), [
    (fmt.count, 1234567, "1,234,567"), (fmt.count, None, "—"), (fmt.number, 1234.56, "1,234.6"),
    (fmt.percent, 0.4237, "42.4 %"), (fmt.duration, 0.25, "250 ms"),
    (fmt.duration, 42.34, "42.3 s"), (fmt.duration, 95, "1 min 35 s"),
    (fmt.duration, 7300, "2 h 2 min"), (fmt.size, 1536, "1.5 KiB"),
    (fmt.size, 3 * 2**30, "3.0 GiB"), (fmt.size, 12, "12 B"), (fmt.percent, float("nan"), "—"),
])
def test_numbers_for_people(fn, value, text):
    assert fn(value) == text
