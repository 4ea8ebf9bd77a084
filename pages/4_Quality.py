"""Quality: what each KV cache format costs, measured against the fp32 full cache."""

import streamlit as st

from engine.config import KV_DTYPES, ConfigError, RunConfig
from engine.models.config import MODEL_CONFIGS
from ui import quality_view, resources, session, widgets

st.set_page_config(page_title="Quality · KV Cache Lab", page_icon=":material/query_stats:",
                   layout="wide")
session.init_state()
widgets.sidebar_nav()
JOB_KEY = "quality_job"
if JOB_KEY not in st.session_state:
    st.session_state[JOB_KEY] = None

st.title("Quality")
st.caption("Each point is one evaluation: the bundled held set (public-domain prose) is "
           "prefilled through the cache, then its last tokens are fed one decode step at a "
           "time; the next-token distributions are compared with the fp32 full cache's on the "
           "same tokens. Lower-left is better: fewer bytes per token, less divergence.")

results = resources.quality_results()
if results.empty:
    st.info("No evaluations stored yet: run one below, or `python cli.py quality --kv-dtype "
            "int8`.", icon=":material/lightbulb:")
else:
    left, right = st.columns([3, 2])
    with left:
        st.altair_chart(quality_view.tradeoff_chart(results), width="stretch")
    with right:
        table = results[quality_view.TABLE_COLUMNS].sort_values("id", ascending=False)
        st.dataframe(table, hide_index=True, column_config={
            "kl_mean": st.column_config.NumberColumn("KL", format="%.5f"),
            "top1": st.column_config.NumberColumn("top-1", format="percent"),
            "kv_bytes_per_token": st.column_config.NumberColumn("bytes/token", format="%.1f"),
        })

st.header("Evaluate a cache")
c = st.columns(4)
model = c[0].selectbox("model", sorted(MODEL_CONFIGS), key="q_model")
kv_dtype = c[1].selectbox("KV dtype", [k for k in KV_DTYPES if k != "auto"], index=4,
                          key="q_kv_dtype")
rotate = c[2].toggle("Hadamard rotation", False, key="q_rotate",
                     help="rotate keys and queries before quantizing (fp8, int8, int4)")
block_size = c[3].number_input("block size", min_value=1, value=16, key="q_block_size")
c = st.columns(4)
policy = c[0].text_input("layer policy", "full", key="q_policy")
context = c[1].number_input("context (tokens)", min_value=16, value=2048, step=256,
                            key="q_context")
num_scored = c[2].number_input("scored tokens", min_value=1, value=256, step=64,
                               key="q_num_scored")
passages = c[3].number_input("passages", min_value=1, max_value=12, value=8, key="q_passages")
config, problem = None, None
try:
    config = RunConfig(model=model, kv_dtype=kv_dtype, kv_rotate=rotate, policy=policy,
                       block_size=int(block_size), dtype="fp32",  # the cache's cost alone
                       max_model_len=min(int(context) + 1,
                                         MODEL_CONFIGS[model].max_position_embeddings))
except ConfigError as exc:
    problem = str(exc)
if problem is None and int(num_scored) >= int(context):
    problem = "scored tokens: must be fewer than the context"
if problem:
    st.error(problem, icon=":material/warning:")

job = st.session_state[JOB_KEY]
busy = job is not None and not job.done
if st.button("Evaluate", type="primary", disabled=busy or config is None, key="q_run"):
    st.session_state[JOB_KEY] = quality_view.QualityJob(
        resources.get_store(), config, context=int(context), num_scored=int(num_scored),
        passages=int(passages), load=resources.get_model).start()
    st.rerun()


@st.fragment(run_every=1.0 if busy else None)
def job_panel() -> None:
    job = st.session_state[JOB_KEY]
    if job is None:
        return
    if not job.done:
        st.progress(job.fraction, text=f"{job.phase}: {100 * job.fraction:.0f} %")
        return
    if job.error:
        st.error(f"The evaluation failed: {job.error}", icon=":material/error:")
        if job.details:
            with st.expander("details"):
                st.code(job.details)
    else:
        f = job.figures
        st.success(f"Result {job.result_id}: KL {f['kl_mean']:.5f}, top-1 "
                   f"{100 * f['top1']:.2f} %, {f['kv_bytes_per_token']:,.0f} bytes per token.",
                   icon=":material/check_circle:")
    if busy:  # it just finished: redraw the page so the chart shows the new point
        resources.refresh_quality()
        st.rerun(scope="app")


job_panel()
