"""Pieces of the Replay page: following a running run, stepping and jumping, the block grid with
its inspector, and the whole-run charts. Session keys are set here, behind guards; the page
lays the pieces out."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from engine.trace import BlockState
from store import RunInfo
from ui import analysis, block_grid, block_grid_chart, block_text, charts, resources, timeline
from ui import format as fmt
from ui.block_cells import change_kinds, describe
from ui.free_queue import free_queue_caption, free_queue_frame, free_queue_spec
from ui.holders import NULL, Holders

STEP_KEY = "replay_step"
FOLLOW_KEY = "replay_follow"
POLL_S = 2.0  # how often the replay of a running run looks for new steps
PAGE_DRAWN_KEY = "replay_page_drawn"  # when this session's last Replay page run ended
CUMULATIVE = ("tokens_per_s", "blocks", "hit_rate", "evictions")
PER_STEP = ("kv_usage_pct", "prefix_per_step", "tokens_per_step")
X_AXES = {"step": "step", "t": "time (s)"}


# Following a running run ------------------------------------------------------------------
def follow(run_id: int, status: str, last: int) -> None:
    """For a run still being written: a toggle to follow its head, and a poll every POLL_S
    that reruns the page when steps were added (the slider and charts then grow).

    The poll reruns the page only once this page run has drawn to its end (`page_drawn`), and
    then not sooner than the page took to draw. A run writes steps every few milliseconds, so
    it has always grown by the next poll; rerunning whenever it had would, on a busy machine
    where the page takes longer than POLL_S, restart the page before it finished drawing, over
    and over: a page that never shows its grid and a Stop button that moves under the mouse."""
    if status != "running":
        return
    st.toggle("follow the newest step", key=FOLLOW_KEY,
              help="While the run goes on, jump to each new step as it is written")
    page_started = time.monotonic()

    @st.fragment(run_every=POLL_S)
    def poll() -> None:
        now_status, now_last = resources.run_progress(run_id)
        st.caption(f"Recording: {fmt.count(now_last)} steps so far.")
        drawn = st.session_state.get(PAGE_DRAWN_KEY, 0.0)
        if drawn < page_started:  # this page run is still drawing (or was cut off)
            return
        idle_enough = time.monotonic() - drawn >= max(POLL_S / 2, drawn - page_started)
        if idle_enough and (now_last != last or now_status != status):
            resources.refresh_runs()
            st.rerun(scope="app")

    poll()


def page_drawn() -> None:
    """Mark the Replay page as drawn to its end: the poll of a running run may rerun it now."""
    st.session_state[PAGE_DRAWN_KEY] = time.monotonic()


# Stepping and jumping ---------------------------------------------------------------------
def set_step(step: int) -> None:
    st.session_state[STEP_KEY] = int(step)


def _typed() -> None:
    value = st.session_state.get("replay_step_typed")
    if value is not None:
        set_step(value)


def _jump(candidates: np.ndarray, forward: bool) -> None:
    target = analysis.neighbour(candidates, st.session_state[STEP_KEY], forward)
    if target is not None:
        set_step(target)


def navigation(run_id: int, rev: str, first: int, last: int) -> None:
    """Type a step; jump to the previous or next preemption, eviction or prefix hit."""
    jumps = resources.jump_steps(run_id, rev)
    st.session_state["replay_step_typed"] = st.session_state[STEP_KEY]
    cols = st.columns([1.2, 1.6, 0.7, 0.7])
    cols[0].number_input("go to step", first, last, key="replay_step_typed", step=1,
                         on_change=_typed)
    kind = cols[1].selectbox(
        "jump to", list(jumps), key="replay_jump_kind",
        format_func=lambda k: f"{k} ({fmt.count(len(jumps[k]))} steps)")
    step = st.session_state[STEP_KEY]
    previous = analysis.neighbour(jumps[kind], step, forward=False)
    following = analysis.neighbour(jumps[kind], step, forward=True)
    with cols[2]:
        st.write("")
        st.button("previous", icon=":material/skip_previous:", key="replay_prev",
                  on_click=_jump, args=(jumps[kind], False), disabled=previous is None,
                  width="stretch", help=f"the previous step with a {kind}")
    with cols[3]:
        st.write("")
        st.button("next", icon=":material/skip_next:", key="replay_next", on_click=_jump,
                  args=(jumps[kind], True), disabled=following is None, width="stretch",
                  help=f"the next step with a {kind}")


# The grid and its inspector ----------------------------------------------------------------
def zoom_control(num_blocks: int, layout: block_grid.GridLayout) -> tuple[int, int] | None:
    """A range slider over the block ids once the grid aggregates (or has been zoomed)."""
    key = "replay_zoom"
    full = (0, num_blocks - 1)
    if not layout.aggregated and st.session_state.get(key, full) == full:
        return None
    if key not in st.session_state or st.session_state.get("replay_zoom_n") != num_blocks:
        st.session_state[key], st.session_state["replay_zoom_n"] = full, num_blocks
    lo, hi = st.slider("zoom: block ids", 0, num_blocks - 1, key=key,
                       step=max(1, num_blocks // 1000),
                       help="Narrow the grid to a range of blocks; one cell per block once "
                            f"the range has at most {block_grid.MAX_CELLS:,}")
    return (lo, hi) if (lo, hi) != full else None


def grid(info: RunInfo, state: BlockState, holders: Holders | None,
         step_events: pd.DataFrame, step: int) -> None:
    """The block grid (clicking a block inspects it; clicking a range zooms into it)."""
    n = len(state.ref_counts)
    labels = block_grid.group_labels(info.config)
    lanes = len(labels) if len(labels) > 1 else 0
    layout = block_grid.plan(n, lanes, zoom_control(n, block_grid.plan(n, lanes)))
    highlight = st.session_state.get("replay_request")
    book = block_text.token_book(info.config)
    bs = info.config.block_size
    text = (lambda r, i: book.text(r, i, bs)) if book is not None else None
    frame = block_grid.block_frame(state, layout, group_labels=labels, holders=holders,
                                   step_events=step_events, highlight=highlight,
                                   token_text=text, block_size=bs)
    per_cell = (f" · each cell {fmt.count(layout.blocks_per_cell)} blocks"
                if layout.aggregated else "")
    st.caption(f"**KV blocks after step {step}**: {fmt.count(layout.hi - layout.lo + 1)} of "
               f"{fmt.count(n)} shown{per_cell}")
    st.vega_lite_chart(block_grid_chart.block_grid_spec(frame, layout), width="stretch")


def free_queue(state: BlockState, row: pd.DataFrame) -> None:
    if not row.empty:
        r = row.iloc[0]
        st.caption(free_queue_caption(int(r["blocks_free"]), int(r["blocks_cached_free"])))
    st.vega_lite_chart(free_queue_spec(free_queue_frame(state)), width="content")


def inspector(info: RunInfo, state: BlockState, holders: Holders | None,
              step_events: pd.DataFrame) -> None:
    """A block's holders, chain position and tokens; a request's block tables in order."""
    n = len(state.ref_counts)
    left, right = st.columns(2)
    with left:
        block = st.number_input("inspect block", 0, max(0, n - 1), value=None, step=1,
                                key="replay_block", placeholder="a block id")
        if block is not None:
            _block_panel(info, state, holders, int(block), step_events)
    with right:
        request = st.number_input("highlight request", 0, None, value=None, step=1,
                                  key="replay_request", placeholder="a request id",
                                  help="Outlines its blocks in the grid and lists its block "
                                       "tables: the prefix chain, block by block")
        if request is not None:
            _request_panel(info, state, holders, int(request))


def _block_panel(info: RunInfo, state: BlockState, holders: Holders | None, block: int,
                 step_events: pd.DataFrame) -> None:
    holdings = holders.holders_of(block) if holders is not None else []
    book = block_text.token_book(info.config)
    bs = info.config.block_size
    text = (lambda r, i: book.text(r, i, bs)) if book is not None else None
    d = describe(state, block, holdings, holders, text, bs)
    ref = state.ref_counts[block]
    state_name = ("in use" if ref > 0 else
                  "free, cached" if state.block_hashes[block] is not None else "free")
    changes = ", ".join(change_kinds(step_events).get(block, [])) or "none"
    st.markdown(f"**Block {block}**: {state_name}, ref count **{ref}**, KV cache group "
                f"{d['group']}  \nhash `{d['hash']}` · parent's hash `{d['parent'] or '—'}`  \n"
                f"changes this step: {changes}")
    if holdings:
        rows = [{"request": h.request_id, "group": h.group_id, "slot": h.index,
                 "tokens": f"{h.index * bs}-{(h.index + 1) * bs - 1}"} for h in holdings]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        st.markdown(f"tokens {d['tokens']}: {_quoted(d['text'], info)}")
    elif ref == 0:
        st.caption("No request holds it" + (": a prefix hit can still revive it until it is "
                                             "evicted." if state.block_hashes[block] else "."))


def _request_panel(info: RunInfo, state: BlockState, holders: Holders | None,
                   request: int) -> None:
    if holders is None:
        st.caption("Block tables are not available for this run.")
        return
    tables = holders.tables_of(request)
    if not tables:
        st.caption(f"Request {request} holds no blocks after this step (waiting, preempted, "
                   "finished, or not arrived yet).")
        return
    book = block_text.token_book(info.config)
    bs = info.config.block_size
    rows = []
    for group, table in tables.items():
        for index, b in enumerate(table):
            ref = state.ref_counts[b] if b != NULL else 0
            rows.append({
                "group": group, "slot": index, "block": None if b == NULL else b,
                "tokens": f"{index * bs}-{(index + 1) * bs - 1}",
                "ref count": ref, "shared": ref > 1,
                "hash": holders.slot_hash(request, group, index) or "",
                "text": (book.text(request, index, bs) or "") if book is not None else ""})
    st.caption(f"Request {request}'s block table{'s' if len(tables) > 1 else ''}, slot by "
               "slot: its prefix chain (an empty block is a null slot, given back)")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={"shared": st.column_config.CheckboxColumn()})


def _quoted(text: str, info: RunInfo) -> str:
    if text == "":
        if block_text.unavailable(info.config):
            return "*tokens not recorded*"
        return "*reading the run's prompts…*"
    return f"`{text}`"


# Whole-run charts -------------------------------------------------------------------------
def chart_specs(run_id: int, rev: str, last: int, x: str) -> dict[str, dict[str, Any]]:
    names = (*CUMULATIVE, *PER_STEP)
    specs = {name: resources.run_chart_spec(run_id, rev, name, last, x) for name in names}
    specs["requests_by_state"] = resources.run_chart_spec(run_id, rev, "requests_by_state",
                                                         last)
    return specs


def charts_at(specs: dict[str, dict[str, Any]], step: int, t: float, x: str) -> None:
    """Cumulative charts on the left, per-step ones on the right, each with the step's rule."""
    value = t if x == "t" else step
    left, right = st.columns(2)
    with left:
        for name in CUMULATIVE:
            st.vega_lite_chart(charts.with_step_rule(specs[name], value, field=x),
                               width="stretch")
    with right:
        for name in PER_STEP:
            st.vega_lite_chart(charts.with_step_rule(specs[name], value, field=x),
                               width="stretch")
        st.vega_lite_chart(charts.with_step_rule(specs["requests_by_state"], step,
                                                 color="#111827"), width="stretch")


def request_timeline(run_id: int, rev: str, last: int, step: int, num_pages: int,
                     num_requests: int) -> None:
    """One page of the Gantt chart; the pages when there are many requests."""
    page = 1
    if num_pages > 1:
        page = st.number_input(
            f"timeline page (of {fmt.count(num_pages)}, {timeline.PAGE_SIZE} requests each; "
            f"{fmt.count(num_requests)} requests in all)", 1, num_pages, key="replay_page")
    spec = resources.timeline_spec(run_id, rev, last, int(page))
    st.vega_lite_chart(charts.with_step_rule(spec, step, color="#111827"), width="stretch")


# Requests ---------------------------------------------------------------------------------
def _pick_request(key: str, table: pd.DataFrame) -> None:
    rows = st.session_state[key].selection.rows
    if rows:
        st.session_state["replay_request"] = int(table["request"].iloc[rows[0]])


def request_table(run_id: int, rev: str) -> None:
    """Every request with its latencies and outcome; choosing a row highlights its blocks."""
    table = resources.request_table(run_id, rev)
    if table.empty:
        st.caption("No request has finished or been rejected yet.")
        return
    rejected = int(table["finish or rejection reason"].str.startswith("rejected").sum())
    st.caption(f"{fmt.count(len(table))} requests"
               + (f", {fmt.count(rejected)} rejected" if rejected else "")
               + ". Choose a row to outline the request's blocks in the grid.")
    st.dataframe(table, hide_index=True, width="stretch", key="replay_requests",
                 on_select=lambda: _pick_request("replay_requests", table),
                 selection_mode="single-row",
                 column_config={c: st.column_config.NumberColumn(format="%.1f")
                                for c in ("TTFT (ms)", "mean TPOT (ms)")})
