"""Replay: step through a stored run, block by block, with the whole run's charts around it."""

import streamlit as st

from store import StoreError
from ui import block_grid, charts, resources, session, widgets

st.set_page_config(page_title="Replay · KV Cache Lab", page_icon="🎞️", layout="wide")
session.init_state()
widgets.sidebar_nav()
if "replay_playing" not in st.session_state:
    st.session_state.replay_playing = False
SPEEDS = (1, 5, 25, 100)

st.title("Replay")
with st.sidebar:
    widgets.upload_run_widget(key="replay_import")
runs = resources.list_runs()
if runs.empty:
    st.info("No runs stored yet: run the demo on the home page or a run in Experiment.",
            icon="💡")
    st.page_link("app.py", label="Home: run the demo", icon="🏠")
    st.stop()

top = st.columns([4, 1, 1])
with top[0]:
    run_id = widgets.pick_run(runs, key="replay_run")
rev = resources.run_rev(runs, run_id)
info = resources.run_info(run_id, rev)
steps = resources.steps(run_id, rev)
with top[1]:
    st.write("")
    widgets.download_run_button(run_id)
with top[2]:
    st.write("")
    st.page_link(widgets.COMPARE_PAGE, label="Compare runs", icon="⚖️")

st.caption(f"{info.status} · model {info.model or info.config.model} · device {info.device} · "
           f"{info.summary.get('num_blocks', info.config.resolved_num_blocks)} blocks of "
           f"{info.config.block_size} tokens · "
           f"{len(info.config.kv_groups())} KV cache group(s), policy {info.config.policy} · "
           f"prefix caching {'on' if info.config.enable_prefix_caching else 'off'} · "
           f"created {info.created_at:%Y-%m-%d %H:%M}")
with st.expander("Summary and settings"):
    widgets.summary_metrics(info.summary)
    if info.error:
        st.error(info.error)
    st.json(info.config.to_dict(), expanded=False)

if steps.empty:
    st.warning("This run recorded no steps.")
    st.stop()
first, last = int(steps["step"].min()), int(steps["step"].max())
# Keyed on the run only: a run still being written grows every few seconds, and that must not
# send the slider back to step 1 or stop playback. The clamp keeps the step within the steps so far.
if st.session_state.get("replay_for") != run_id:  # a new run: start at its first step
    st.session_state.replay_step = first
    st.session_state.replay_for = run_id
    st.session_state.replay_playing = False
st.session_state.replay_step = min(max(st.session_state.get("replay_step", first), first), last)


def toggle_play() -> None:
    st.session_state.replay_playing = not st.session_state.replay_playing
    if st.session_state.replay_step >= last:  # play from the start again
        st.session_state.replay_step = first


controls = st.columns([1, 1, 6])
playing = st.session_state.replay_playing
controls[0].button("Pause" if playing else "Play", icon="⏸️" if playing else "▶️",
                   on_click=toggle_play, key="replay_play", width="stretch")
speed = controls[1].selectbox("steps per tick", SPEEDS, key="replay_speed",
                              label_visibility="collapsed",
                              format_func=lambda s: f"{s} step{'s' if s > 1 else ''}/tick")
events = resources.request_events(run_id, rev)
lanes = block_grid.group_labels(info.config)  # one grid lane per KV cache group
specs = {name: resources.run_chart_spec(run_id, rev, name, last)
         for name in ("tokens_per_s", "blocks", "hit_rate", "evictions", "requests")}

@st.fragment(run_every=0.5 if playing else None)
def step_view() -> None:
    if st.session_state.replay_playing:
        nxt = st.session_state.replay_step + speed
        if nxt > last:
            st.session_state.replay_playing = False
            st.rerun(scope="app")
        st.session_state.replay_step = nxt
    step = st.slider("step", first, last, key="replay_step")
    try:
        state = resources.block_state_at(run_id, step, rev)
    except StoreError as e:  # e.g. a trace without keyframes
        st.error(f"The block state of step {step} cannot be rebuilt: {e}")
        return
    row = steps.loc[steps["step"] == step]
    grid_col, side = st.columns([3, 2])
    with grid_col:
        frame = block_grid.block_frame(state, group_labels=lanes)
        st.vega_lite_chart(block_grid.block_grid_spec(frame, title=f"KV blocks after step {step}"),
                           width="content")
    with side:
        if not row.empty:
            st.markdown(widgets.step_figures(row.iloc[0]))
        queue = block_grid.free_queue_frame(state)
        st.vega_lite_chart(block_grid.free_queue_spec(queue), width="content")
        st.markdown(f"**Events of step {step}**")
        step_events = resources.block_events_at(run_id, step, rev)
        req_events = events.loc[events["step"] == step, ["request_id", "label", "kind"]]
        if step_events.empty and req_events.empty:
            st.caption("No block or request events in this step.")
        if not req_events.empty:
            st.dataframe(req_events, hide_index=True,
                         column_config={"kind": "request event", "label": "file id"})
        if not step_events.empty:
            st.dataframe(step_events.drop(columns=["step"]), hide_index=True)
    left, right = st.columns(2)
    for i, name in enumerate(("tokens_per_s", "blocks", "hit_rate", "evictions")):
        with left if i % 2 == 0 else right:
            st.vega_lite_chart(charts.with_step_rule(specs[name], step), width="stretch")
    st.vega_lite_chart(charts.with_step_rule(specs["requests"], step, color="#111827"),
                       width="stretch")

step_view()
