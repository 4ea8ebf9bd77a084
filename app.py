"""Home: what the lab shows, the latest runs, and the one-click demo that opens its replay."""

import streamlit as st

from ui import format as fmt
from ui import resources, session, widgets

st.set_page_config(page_title="KV Cache Lab", page_icon=":material/view_module:", layout="wide")
session.init_state()
widgets.sidebar_nav()
if "demo_open_replay" not in st.session_state:
    st.session_state.demo_open_replay = False

st.title("KV Cache Lab")
st.markdown(
    "A real PyTorch inference engine serves requests through a **paged KV cache** "
    "(vLLM-style blocks, ref counts, prefix caching, LRU eviction) and records every step. "
    "**Experiment** runs a workload with the settings you choose and draws memory and "
    "throughput live; **Replay** steps through any stored run block by block. "
    "**Compare** lays runs side by side: throughput, cache hits, evictions, preemptions "
    "and latency percentiles."
)

live = session.live_run()
demo = live if live is not None and session.DEMO_TAG in live.tags else None
config = session.demo_config()  # what is shown is what runs: the same object

left, right = st.columns([2, 3])
with left:
    clicked = st.button(
        "Run the demo", type="primary", icon=":material/play_arrow:",
        disabled=session.is_running(),
        help="Eight chats on the bundled SmolLM2-135M in a cache too small for them all; opens "
             "the replay when done (well under a minute on a laptop CPU)")
with right:
    st.caption(
        f"The demo serves the `{config.workload.name}` workload, {config.model} on "
        f"{config.device} (auto: a GPU if there is one): three chats sharing a ~270-token "
        f"system prompt, two without it, then three with it again, {config.max_num_seqs} "
        f"running at most in {config.num_blocks} blocks of {config.block_size} tokens. So it "
        "shows prefix sharing (ref counts above 1), LRU eviction of cached free blocks, a "
        "preemption and its recompute, and prefix re-hits after eviction.")
    with st.expander("the demo's settings"):
        st.json(config.to_dict(), expanded=False)
if clicked:
    session.start_run(config, name="demo: eviction and preemption", tags=(session.DEMO_TAG,))
    st.session_state.demo_open_replay = True
    st.rerun()

if demo is not None:
    if not demo.done:
        widgets.live_run_panel(demo, show_charts=False, key="demo")
    elif demo.phase == "failed":
        widgets.run_failure(demo.error, demo.traceback, what="The demo")
    elif st.session_state.demo_open_replay and demo.run_id is not None:
        st.session_state.demo_open_replay = False
        st.switch_page(widgets.REPLAY_PAGE, query_params={"run": str(demo.run_id)})
    elif demo.run_id is not None:
        widgets.replay_link(demo.run_id, "Open the demo's replay")
others = [r for r in session.active_runs() if r is not demo]
if others:
    st.subheader("Running now")
    widgets.other_runs_panel(others, key="home_running")

st.subheader("Latest runs")
runs = resources.list_runs(limit=10)
if runs.empty:
    st.info("No runs yet. **Run the demo** above, or set up your own in Experiment.",
            icon=":material/arrow_upward:")
else:
    widgets.runs_table(runs)
    st.caption(f"Open a replay ({fmt.count(len(runs))} latest; rename or delete a run on its "
               "replay):")
    for col, (_, row) in zip(st.columns(5), runs.head(5).iterrows(), strict=False):
        with col:
            imported = " · imported" if row.get("imported") is True else ""
            widgets.replay_link(int(row["run_id"]),
                                f"#{row['run_id']} {row['name'] or ''}{imported}")

with st.expander("Import a run from a trace file"):
    imported = widgets.upload_run_widget(key="home_import")
    if imported is not None:
        widgets.replay_link(imported, f"Open run #{imported}")

st.divider()
c = st.columns(3)
c[0].page_link(widgets.EXPERIMENT_PAGE, label="Experiment: run your own settings",
               icon=":material/science:")
c[1].page_link(widgets.REPLAY_PAGE, label="Replay: step through a run",
               icon=":material/slideshow:")
c[2].page_link(widgets.COMPARE_PAGE, label="Compare: runs side by side",
               icon=":material/compare_arrows:")
