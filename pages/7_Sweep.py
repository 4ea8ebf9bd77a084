"""Sweep: a grid of configs run in parallel on a local Ray, then the trade-offs plotted."""

import streamlit as st

from ui import config_form, resources, session, sweep_form, sweep_view, widgets
from ui.live_sweep import LiveSweep

st.set_page_config(page_title="Sweep · KV Cache Lab", page_icon=":material/tune:", layout="wide")
session.init_state()
widgets.sidebar_nav()
LIVE_KEY = "sweep_live"
if LIVE_KEY not in st.session_state:
    st.session_state[LIVE_KEY] = None

st.title("Sweep")
st.caption("Which block size, KV budget, KV dtype or scheduler limit is best for a workload? "
           "Pick a base config and the settings to vary; every combination runs as a Ray task "
           "and lands in the store as its own run.")

live: LiveSweep | None = st.session_state[LIVE_KEY]
if live is not None:
    st.subheader(f"Sweep #{live.sweep_id}")
    if not live.done:
        sweep_view.live_sweep_panel(live)
    else:
        sweep_view.live_outcome(live)

results, new = st.tabs(["Results", "New sweep"])
with new:
    st.header("Base config")
    values, slots = config_form.render_config_form()
    base = config_form.validate(values, slots)
    st.header("Axes")
    axes = sweep_form.render_axes_form()
    spec = sweep_form.build_spec(base, axes, values["name"] or None) if base else None
    if spec is not None:
        st.markdown(sweep_form.describe_points(spec))
    busy = live is not None and not live.done
    if busy:
        st.caption("A sweep is running; stop it or wait for it to finish to start another.")
    if st.button("Launch on local Ray", type="primary", icon=":material/rocket_launch:",
                 key="sweep_launch", disabled=spec is None or busy):
        st.session_state[LIVE_KEY] = LiveSweep(resources.get_store(), spec,
                                               max_parallel=axes.max_parallel).start()
        st.session_state["sweep_pick"] = st.session_state[LIVE_KEY].sweep_id
        resources.refresh_sweeps()
        st.rerun()

with results:
    sweeps = resources.list_sweeps()
    if sweeps.empty:
        st.info("No sweeps yet: set one up under **New sweep**, or run "
                "`python cli.py sweep --base config.json --axis block_size=8,16,32`.",
                icon=":material/lightbulb:")
    else:
        sweep_id = sweep_view.pick_sweep(sweeps)
        row = sweeps.loc[sweeps["sweep_id"] == sweep_id].iloc[0]
        sweep_view.sweep_results(sweep_id, row)
