"""Hardware: where a run's device memory went, the device's own readings over time, and each
decode step against the least time its memory traffic allows."""

import streamlit as st

from ui import hardware_view, resources, session, widgets

st.set_page_config(page_title="Hardware · KV Cache Lab", page_icon=":material/memory:",
                   layout="wide")
session.init_state()
widgets.sidebar_nav()

st.title("Hardware")
runs = resources.list_runs()
if runs.empty:
    st.info("No runs stored yet: run the demo on the home page or a run in Experiment.",
            icon=":material/lightbulb:")
    st.stop()
run_id = widgets.pick_run(runs, key="hardware_run")
rev = resources.run_rev(runs, run_id)
info = resources.run_info(run_id, rev)
summary = info.summary
device = summary.get("device_info") or {}
if device:
    memory = device.get("memory_bytes") or 0
    what = (f"{device.get('cores')} cores, {device.get('threads')} torch threads"
            if device.get("kind") == "cpu"
            else f"driver {device.get('driver', 'unknown')}, CUDA {device.get('torch_cuda')}")
    st.caption(f"**{device.get('name')}** · {memory / 2**30:,.1f} GiB · {what} · measured read "
               f"bandwidth {(summary.get('bandwidth_bytes_per_s') or 0) / 1e9:,.1f} GB/s")
if summary.get("gpu_note"):
    st.info(summary["gpu_note"], icon=":material/info:")  # said once for the run, not per chart

profile = summary.get("memory_profile") or {}
if profile:
    st.altair_chart(hardware_view.memory_chart(profile), width="stretch")
    st.caption(f"KV blocks: {profile.get('kv_blocks_rule', '')}. Measured "
               f"{profile.get('measured_bytes', 0) / 2**20:,.0f} MiB "
               f"({'RSS' if profile.get('device') == 'cpu' else 'device'}) after allocation.")
else:
    st.caption("This run was recorded without a memory profile (an older kvlab).")

steps = resources.steps(run_id, rev)
samples = resources.telemetry(run_id, rev)
left, right = st.columns(2)
with left:
    if not steps.empty:
        st.altair_chart(hardware_view.throughput_chart(steps), width="stretch")
with right:
    if samples.empty:
        st.caption("No telemetry in this run (recorded with --telemetry-hz 0, or by an older "
                   "kvlab).")
    else:
        shown = [c for c in hardware_view.TELEMETRY_LABELS if samples[c].notna().any()]
        column = st.selectbox("reading", shown, key="hardware_reading",
                              format_func=hardware_view.TELEMETRY_LABELS.get)
        st.altair_chart(hardware_view.telemetry_chart(samples, column), width="stretch")

roof = hardware_view.roofline_frame(steps)
if roof.empty:
    st.caption("No decode-only steps with a roofline bound in this run.")
else:
    st.altair_chart(hardware_view.roofline_chart(roof), width="stretch")
    st.caption(f"median decode step {roof['measured_ms'].median():.2f} ms against a bound of "
               f"{roof['bound_ms'].median():.2f} ms: {roof['ratio'].median():.2f}x (the bound "
               "reads every weight and every KV block in use once at the measured bandwidth)")
