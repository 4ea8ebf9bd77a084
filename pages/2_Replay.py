"""Replay: step through a stored run, block by block, with the whole run's charts around it."""

import streamlit as st

from store import StoreError
from ui import analysis, replay_view, resources, session, timeline, widgets
from ui.replay_view import STEP_KEY

st.set_page_config(page_title="Replay · KV Cache Lab", page_icon=":material/slideshow:",
                   layout="wide")
session.init_state()
widgets.sidebar_nav()
if "replay_playing" not in st.session_state:
    st.session_state.replay_playing = False
SPEEDS = (1, 5, 25, 100)

st.title("Replay")
with st.sidebar:
    imported = widgets.upload_run_widget(key="replay_import")
    if imported is not None:
        widgets.replay_link(imported, f"Open run #{imported}")
runs = resources.list_runs()
wanted_run = st.query_params.get("run")
if wanted_run and wanted_run.isdigit() and (
        runs.empty or int(wanted_run) not in set(runs["run_id"].astype(int))):
    resources.refresh_runs()  # a link to a run newer than the cached list (it lives 5 s)
    runs = resources.list_runs()
if runs.empty:
    st.info("No runs stored yet: run the demo on the home page or a run in Experiment.",
            icon=":material/lightbulb:")
    st.page_link("app.py", label="Home: run the demo", icon=":material/home:")
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
    st.page_link(widgets.COMPARE_PAGE, label="Compare runs", icon=":material/compare_arrows:")

st.caption(f"{info.status}{' (imported)' if info.imported else ''} · model "
           f"{info.model or info.config.model} · device {info.device} · "
           f"{info.summary.get('num_blocks', info.config.resolved_num_blocks):,} blocks of "
           f"{info.config.block_size} tokens · "
           f"{len(info.config.kv_groups())} KV cache group(s), policy {info.config.policy} · "
           f"prefix caching {'on' if info.config.enable_prefix_caching else 'off'} · "
           f"created {info.created_at:%Y-%m-%d %H:%M}")
with st.expander("Summary and settings"):
    widgets.summary_metrics(info.summary)
    if info.error:
        widgets.run_failure(widgets.error_line(info.error), info.error)
    st.json(info.config.to_dict(), expanded=False)
with st.expander("Rename or delete"):
    widgets.manage_run(info, key="replay_manage")

if steps.empty:
    st.warning("This run recorded no steps yet." if info.status == "running" else
               "This run recorded no steps.")
    replay_view.follow(run_id, info.status, 0)
    replay_view.page_drawn()
    st.stop()
first, last = int(steps["step"].min()), int(steps["step"].max())
events = resources.request_events(run_id, rev)
story = analysis.story(steps, events) if session.DEMO_TAG in info.tags else None
# Keyed on the run only: a run still being written grows every few seconds, and that must not
# send the slider back to the start or stop playback. The clamp keeps the step within the run.
if st.session_state.get("replay_for") != run_id:  # a new run: where to start
    wanted = st.query_params.get("step")
    start = int(wanted) if wanted and wanted.isdigit() else story[0] if story else first
    st.session_state[STEP_KEY] = start
    st.session_state.replay_for = run_id
    st.session_state.replay_playing = False
    for key in ("replay_block", "replay_request", "replay_zoom", "replay_page"):
        st.session_state.pop(key, None)
if st.session_state.get(replay_view.FOLLOW_KEY) and info.status == "running":
    st.session_state[STEP_KEY] = last
st.session_state[STEP_KEY] = min(max(st.session_state.get(STEP_KEY, first), first), last)
replay_view.follow(run_id, info.status, last)
if story is not None:
    st.info(story[1], icon=":material/lightbulb:")


def toggle_play() -> None:
    st.session_state.replay_playing = not st.session_state.replay_playing
    if st.session_state[STEP_KEY] >= last:  # play from the start again
        st.session_state[STEP_KEY] = first


controls = st.columns([1, 1, 3, 3])
playing = st.session_state.replay_playing
controls[0].button("Pause" if playing else "Play",
                   icon=":material/pause:" if playing else ":material/play_arrow:",
                   on_click=toggle_play, key="replay_play", width="stretch")
speed = controls[1].selectbox("steps per tick", SPEEDS, key="replay_speed",
                              label_visibility="collapsed",
                              format_func=lambda s: f"{s} step{'s' if s > 1 else ''}/tick")
x = controls[3].radio("charts over", list(replay_view.X_AXES), key="replay_x",
                      horizontal=True, format_func=replay_view.X_AXES.get)
specs = replay_view.chart_specs(run_id, rev, last, x)
segments = resources.request_segments(run_id, rev, last)
num_requests = int(segments["request_id"].nunique()) if not segments.empty else 0
created = info.created_at.isoformat()


@st.fragment(run_every=0.5 if playing else None)
def step_view() -> None:
    if st.session_state.replay_playing:
        nxt = st.session_state[STEP_KEY] + speed
        if nxt > last:
            st.session_state.replay_playing = False
            st.rerun(scope="app")
        st.session_state[STEP_KEY] = nxt
    replay_view.navigation(run_id, rev, first, last)
    step = st.slider("step", first, last, key=STEP_KEY)
    try:
        state = resources.block_state_at(run_id, step, rev)
    except StoreError as e:  # e.g. a trace without keyframes
        st.error(f"The block state of step {step} cannot be rebuilt: {e}")
        return
    holders = resources.holders_at(run_id, step, created)
    step_events = resources.block_events_at(run_id, step, rev)
    row = steps.loc[steps["step"] == step]
    grid_col, side = st.columns([3, 2])
    with grid_col:
        replay_view.grid(info, state, holders, step_events, step)
    with side:
        if not row.empty:
            st.markdown(widgets.step_figures(row.iloc[0]))
        replay_view.free_queue(state, row)
        st.markdown(f"**Events of step {step}**")
        req_events = events.loc[events["step"] == step, ["request_id", "label", "kind"]]
        if step_events.empty and req_events.empty:
            st.caption("No block or request events in this step.")
        if not req_events.empty:
            st.dataframe(req_events, hide_index=True,
                         column_config={"kind": "request event", "label": "file id"})
        if not step_events.empty:
            st.dataframe(step_events.drop(columns=["step"]), hide_index=True)
    replay_view.inspector(info, state, holders, step_events)
    t = float(row["t"].iloc[0]) if not row.empty else 0.0
    replay_view.charts_at(specs, step, t, x)
    replay_view.request_timeline(run_id, rev, last, step, timeline.num_pages(segments),
                                 num_requests)


step_view()

st.subheader("Requests")
replay_view.request_table(run_id, rev)
replay_view.page_drawn()  # last: the poll of a running run may rerun the page now
