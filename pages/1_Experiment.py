"""Experiment: set every RunConfig knob, run it with live charts, stop it, open its replay.

Runs belong to the server: a reload or a second tab shows the run still going, with its Stop.
"""

import streamlit as st

from ui import config_form, session, widgets

st.set_page_config(page_title="Experiment · KV Cache Lab", page_icon=":material/science:",
                   layout="wide")
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
        widgets.run_failure(live.error, live.traceback)
    else:
        if live.phase == "interrupted":
            st.warning("Stopped: the run is kept as interrupted, with every step it made.",
                       icon=":material/stop_circle:")
        else:
            st.success("Finished.", icon=":material/check_circle:")
        widgets.summary_metrics(live.summary or {})
        widgets.live_charts(live.steps_frame())
    if live.done and live.run_id is not None:
        widgets.replay_link(live.run_id)
others = [r for r in session.active_runs() if r is not live]
if others:
    st.subheader("Also running on this server")
    widgets.other_runs_panel(others, key="experiment_other")
if live is not None or others:
    st.divider()

st.header("Settings")
values, slots = config_form.render_config_form()
config = config_form.validate(values, slots)
if config is not None:
    total = config.resolved_num_blocks * config.kv_bytes_per_block
    st.caption(f"KV cache: {config.resolved_num_blocks:,} blocks of {config.block_size} tokens, "
               f"{config.kv_bytes_per_block:,} bytes each, {total / 2**20:,.1f} MiB in all "
               f"(sized for {config.kv_dtype if config.kv_dtype != 'auto' else 'fp32 on CPU'}).")
busy = session.is_running()
another = False
if busy:
    another = st.checkbox("Start another run beside the one going", key="exp_another",
                          help="Runs share this machine's cores and slow each other down; "
                               "both are listed here with their Stop buttons")


def start(config, name: str | None) -> None:
    session.start_run(config, name=name)
    st.session_state["exp_another"] = False  # the next one is a choice again


st.button("Run", type="primary", icon=":material/play_arrow:", key="run", on_click=start,
          args=(config, values["name"] or None), disabled=config is None or (busy and not another))
