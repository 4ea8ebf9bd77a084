"""Compare: 2-4 runs overlaid, their latency percentiles, and the settings that differ."""

import streamlit as st

from ui import analysis, charts, resources, session, widgets

st.set_page_config(page_title="Compare · KV Cache Lab", page_icon=":material/compare_arrows:",
                   layout="wide")
session.init_state()
widgets.sidebar_nav()

st.title("Compare")
runs = resources.list_runs()
if len(runs) < 2:
    st.info("Comparing needs at least two stored runs: run the demo, then change a setting "
            "in Experiment (say, prefix caching off) and run again.", icon=":material/lightbulb:")
    st.page_link(widgets.EXPERIMENT_PAGE, label="Experiment", icon=":material/science:")
    st.stop()

labels = {int(r["run_id"]): resources.run_label(r) for _, r in runs.iterrows()}
if "compare_runs" not in st.session_state:  # set once: the two newest runs
    st.session_state.compare_runs = list(labels)[:2]
else:  # a run may have been deleted since
    st.session_state.compare_runs = [r for r in st.session_state.compare_runs if r in labels]
selected = st.multiselect("runs (2 to 4)", list(labels), key="compare_runs",
                          max_selections=4, format_func=labels.get)
if len(selected) < 2:
    st.info("Pick at least two runs.")
    st.stop()

revs = {run_id: resources.run_rev(runs, run_id) for run_id in selected}
infos = {run_id: resources.run_info(run_id, revs[run_id]) for run_id in selected}
names = {run_id: f"#{run_id} {infos[run_id].name or infos[run_id].config.workload.name}"
         for run_id in selected}
series = analysis.stack_runs({names[r]: resources.step_series(r, revs[r]) for r in selected})

st.subheader("Settings that differ")
st.caption("What was chosen for each run: a workload file by its name, and only the settings "
           "of each run's own kind of workload.")
diff = analysis.config_diff({names[r]: infos[r].config.to_dict() for r in selected})
if diff.empty:
    st.caption("The runs have identical settings.")
else:
    st.dataframe(diff, width="stretch")

st.subheader("Over the run")
left, right = st.columns(2)
for i, column in enumerate(("tokens_per_s", "blocks_used", "hit_rate", "evictions",
                            "preemptions", "kv_mib_used")):
    with (left if i % 2 == 0 else right):
        st.altair_chart(charts.overlay_chart(series, column), width="stretch")

st.subheader("Latency")
table = analysis.latency_percentiles(
    {names[r]: resources.requests(r, revs[r]) for r in selected})
st.dataframe(table, hide_index=True, width="stretch",
             column_config={c: st.column_config.NumberColumn(format="%.1f")
                            for c in table.columns if c.endswith("(ms)")})
left, right = st.columns(2)
with left:
    st.altair_chart(charts.percentile_chart(table, "TTFT"), width="stretch")
with right:
    st.altair_chart(charts.percentile_chart(table, "TPOT"), width="stretch")
st.caption("TTFT: first token time minus arrival. TPOT: time per output token after the "
           "first, (finish - first token) / (output tokens - 1).")

st.subheader("Headline figures")
st.dataframe(analysis.summary_table({names[r]: infos[r].summary for r in selected}),
             width="stretch")
