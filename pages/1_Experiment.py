"""Experiment: set every RunConfig knob, run it with live charts, stop it, open its replay."""

import streamlit as st

from ui import config_form, session, widgets

st.set_page_config(page_title="Experiment · KV Cache Lab", page_icon="🧪", layout="wide")
session.init_state()
widgets.sidebar_nav()

st.title("Experiment")
st.caption("Choose the model, the KV cache and the workload; a setting that cannot work is "
           "explained under its widget before anything runs.")

live = session.live_run()
if live is not None:
    title = f"Run #{live.run_id}" if live.run_id is not None else "Run"
    st.subheader(f"{title}: {live.name or live.config.workload.name} — {live.phase}")
    if not live.done:
        widgets.live_run_panel(live, key="experiment")
    elif live.phase == "failed":
        st.error(f"The run failed: {live.error}", icon="🚫")
    else:
        if live.phase == "interrupted":
            st.warning("Stopped: the run is kept as interrupted, with every step it made.",
                       icon="⏹️")
        else:
            st.success(f"Finished in {live.elapsed_s:.1f} s.", icon="✅")
        widgets.summary_metrics(live.summary or {})
        widgets.live_charts(live.steps_frame())
    if live.done and live.run_id is not None:
        widgets.replay_link(live.run_id)
    st.divider()

st.header("Settings")
values, slots = config_form.render_config_form()
config = config_form.validate(values, slots)
if config is not None:
    total = config.resolved_num_blocks * config.kv_bytes_per_block
    st.caption(f"KV cache: {config.resolved_num_blocks} blocks of {config.block_size} tokens, "
               f"{config.kv_bytes_per_block:,} bytes each, {total / 2**20:,.1f} MiB in all "
               f"(sized for {config.kv_dtype if config.kv_dtype != 'auto' else 'fp32 on CPU'}).")
busy = session.is_running()
if busy:
    st.caption("A run is in progress; stop it or wait for it to finish to start another.")
if st.button("Run", type="primary", icon="▶️", disabled=config is None or busy, key="run"):
    session.start_run(config, name=values["name"] or None)
    st.rerun()
