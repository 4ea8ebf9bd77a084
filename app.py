"""Home: what the lab shows, the latest runs, and the one-click demo that opens its replay."""

import streamlit as st

from ui import resources, session, widgets

st.set_page_config(page_title="KV Cache Lab", page_icon="🧱", layout="wide")
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

left, right = st.columns([2, 3])
with left:
    clicked = st.button(
        "Run the demo", type="primary", icon="▶️", disabled=session.is_running(),
        help="Eight chats sharing a system prompt on the bundled SmolLM2-135M; opens the "
             "replay when done (about a minute on a laptop CPU)")
with right:
    st.caption("The demo serves 8 chat requests that share a ~256-token system prompt in a "
               "64-block cache, so prefix hits, block sharing and reuse all show in the replay.")
if clicked:
    session.start_run(session.demo_config(), name="demo: shared prefix",
                      tags=(session.DEMO_TAG,))
    st.session_state.demo_open_replay = True
    st.rerun()

if demo is not None:
    if not demo.done:
        widgets.live_run_panel(demo, show_charts=False, key="demo")
    elif demo.phase == "failed":
        st.error(f"The demo failed: {demo.error}")
    elif st.session_state.demo_open_replay and demo.run_id is not None:
        st.session_state.demo_open_replay = False
        st.switch_page(widgets.REPLAY_PAGE, query_params={"run": str(demo.run_id)})
    elif demo.run_id is not None:
        widgets.replay_link(demo.run_id, "Open the demo's replay")

st.subheader("Latest runs")
runs = resources.list_runs(limit=10)
if runs.empty:
    st.info("No runs yet. **Run the demo** above, or set up your own in Experiment.", icon="👆")
else:
    widgets.runs_table(runs)
    st.caption("Open a replay:")
    for col, (_, row) in zip(st.columns(5), runs.head(5).iterrows(), strict=False):
        with col:
            widgets.replay_link(int(row["run_id"]), f"#{row['run_id']} {row['name'] or ''}")

with st.expander("Import a run from a trace file"):
    imported = widgets.upload_run_widget(key="home_import")
    if imported is not None:
        widgets.replay_link(imported, f"Open run #{imported}")

st.divider()
c = st.columns(3)
c[0].page_link(widgets.EXPERIMENT_PAGE, label="Experiment: run your own settings", icon="🧪")
c[1].page_link(widgets.REPLAY_PAGE, label="Replay: step through a run", icon="🎞️")
c[2].page_link(widgets.COMPARE_PAGE, label="Compare: runs side by side", icon="⚖️")
