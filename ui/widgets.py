"""Widgets more than one page uses: the live-run panel, a run's summary, run picking, and a
run's download (export) and upload (import)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from store import DuplicateImportError, StoreError, export_run, import_run
from ui import analysis, charts, resources
from ui.live_run import LiveRun

REPLAY_PAGE = "pages/2_Replay.py"
EXPERIMENT_PAGE = "pages/1_Experiment.py"
COMPARE_PAGE = "pages/3_Compare.py"
QUALITY_PAGE = "pages/4_Quality.py"
MLA_PAGE = "pages/5_MLA.py"
HARDWARE_PAGE = "pages/6_Hardware.py"
SWEEP_PAGE = "pages/7_Sweep.py"
LIVE_REFRESH_S = 1.0


def sidebar_nav() -> None:
    """The page list (Streamlit's own would call the home page "app")."""
    with st.sidebar:
        st.page_link("app.py", label="Home", icon="🏠")
        st.page_link(EXPERIMENT_PAGE, label="Experiment", icon="🧪")
        st.page_link(REPLAY_PAGE, label="Replay", icon="🎞️")
        st.page_link(COMPARE_PAGE, label="Compare", icon="⚖️")
        st.page_link(QUALITY_PAGE, label="Quality", icon="📉")
        st.page_link(MLA_PAGE, label="MLA", icon="🧬")
        st.page_link(HARDWARE_PAGE, label="Hardware", icon="🖥️")
        st.page_link(SWEEP_PAGE, label="Sweep", icon="🧮")
        st.divider()


def live_charts(steps: pd.DataFrame) -> None:
    """Throughput, blocks used/free/cached, hit rate and preemptions of a run so far."""
    df = analysis.downsample(analysis.step_metrics(steps))
    left, right = st.columns(2)
    with left:
        st.vega_lite_chart(charts.live_spec("tokens_per_s", df), width="stretch")
        st.vega_lite_chart(charts.live_spec("hit_rate", df), width="stretch")
    with right:
        st.vega_lite_chart(charts.live_spec("blocks", analysis.block_mix(df)), width="stretch")
        st.vega_lite_chart(charts.live_spec("preemptions", df), width="stretch")


def _progress_text(live: LiveRun) -> str:
    total = live.requests_total if live.requests_total is not None else "?"
    step = live.steps[-1].step if live.steps else 0
    phase = "stopping" if live.stopping else live.phase
    return (f"{phase}: {live.requests_done}/{total} requests done, step {step}, "
            f"{live.elapsed_s:.0f} s")


def live_run_panel(live: LiveRun, *, show_charts: bool = True, key: str = "live") -> None:
    """Progress, live charts and a Stop button, redrawn every second while the run goes on.

    Call it only when the page found the run not done. The fragment always polls, so a run
    that ends between the page's check and this call is still noticed: the whole page then
    reruns once, so it can show the summary (or move on).
    """

    @st.fragment(run_every=LIVE_REFRESH_S)
    def panel() -> None:
        if live.done:
            resources.refresh_runs()
            st.rerun(scope="app")
        cols = st.columns([5, 1])
        with cols[0]:
            st.progress(live.progress, text=_progress_text(live))
        with cols[1]:
            st.button("Stop", key=f"{key}_stop", on_click=live.stop, type="secondary",
                      disabled=live.done or live.stopping, width="stretch",
                      help="End the run after this step; the trace so far is kept")
        if show_charts:
            live_charts(live.steps_frame())

    panel()


def summary_metrics(summary: dict[str, Any]) -> None:
    """A run's headline figures (RunSummary) as metric tiles."""
    if not summary:
        st.info("No summary: the run did not finish.")
        return
    tiles = [
        ("output tokens/s", f"{summary.get('output_tokens_per_s', 0):.1f}"),
        ("prefix hit rate", f"{summary.get('prefix_hit_rate', 0):.0%}"),
        ("requests done", f"{summary.get('num_finished', 0)}/{summary.get('num_requests', 0)}"),
        ("preemptions", summary.get("num_preemptions", 0)),
        ("evictions", summary.get("num_evictions", 0)),
        ("peak blocks", f"{summary.get('peak_blocks_used', 0)}/{summary.get('num_blocks', 0)}"),
        ("steps", summary.get("steps", 0)),
        ("elapsed", f"{summary.get('elapsed_s', 0):.1f} s"),
    ]
    for row in (tiles[:4], tiles[4:]):
        for col, (label, value) in zip(st.columns(4), row, strict=True):
            col.metric(label, value)
    if summary.get("gpu_note"):  # once per run: the steps' GPU columns are empty, and why
        st.caption(summary["gpu_note"], help="GPU memory, utilisation and power come from "
                   "NVIDIA's NVML; without it the charts show what torch and the OS report")


def step_figures(row: pd.Series) -> str:
    """One StepRecord row as a few lines of Markdown (what Replay shows beside the grid)."""
    r = {k: (int(v) if isinstance(v, float) and v == int(v) else v) for k, v in row.items()}
    return (
        f"**{r['num_running']}** running, **{r['num_waiting']}** waiting · "
        f"**{r['num_prefill_tokens']}** prefill + **{r['num_decode_tokens']}** decode tokens  \n"
        f"blocks: **{r['blocks_used']}** in use, **{r['blocks_cached_free']}** free but cached, "
        f"**{r['blocks_free'] - r['blocks_cached_free']}** free  \n"
        f"prefix cache: **{r['prefix_hit_tokens']}** of {r['prefix_query_tokens']} looked-up "
        f"tokens hit · **{r['num_evicted']}** evicted · **{r['num_preempted']}** preempted · "
        f"{r['duration_s'] * 1000:.0f} ms"
    )


def runs_table(runs: pd.DataFrame) -> None:
    """Recent runs with their headline figures."""
    wanted = ["run_id", "name", "status", "imported", "model", "device", "created_at",
              "num_steps", "output_tokens_per_s", "prefix_hit_rate", "num_preemptions"]
    st.dataframe(runs[[c for c in wanted if c in runs.columns]], hide_index=True,
                 column_config={"prefix_hit_rate": st.column_config.NumberColumn(format="%.2f"),
                                "imported": st.column_config.CheckboxColumn(
                                    help="added from a trace file"),
                                "output_tokens_per_s": st.column_config.NumberColumn(
                                    "tokens/s", format="%.1f")})


def replay_link(run_id: int, label: str = "Open its replay") -> None:
    st.page_link(REPLAY_PAGE, label=label, icon="▶️", query_params={"run": str(run_id)})


def pick_run(runs: pd.DataFrame, *, key: str, label: str = "run") -> int | None:
    """A run selector; the `run` query parameter (a link from another page) preselects."""
    if runs.empty:
        return None
    ids = [int(r) for r in runs["run_id"]]
    labels = {int(r["run_id"]): resources.run_label(r) for _, r in runs.iterrows()}
    wanted = st.query_params.get("run")
    link_key = f"{key}_link"
    if key not in st.session_state or (wanted and wanted != st.session_state.get(link_key)):
        st.session_state[key] = int(wanted) if wanted and wanted.isdigit() and \
            int(wanted) in labels else ids[0]
    elif st.session_state[key] not in labels:
        st.session_state[key] = ids[0]
    run_id = st.selectbox(label, ids, key=key, format_func=labels.get)
    st.query_params["run"] = st.session_state[link_key] = str(run_id)
    return run_id


def _export_bytes(run_id: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = export_run(resources.get_store(), run_id, Path(tmp) / f"run-{run_id}.kvtrace.zip")
        return Path(path).read_bytes()


def download_run_button(run_id: int) -> None:
    """The run's export file, built only when the button is clicked."""
    st.download_button("Download trace", lambda: _export_bytes(run_id),
                       file_name=f"run-{run_id}.kvtrace.zip", mime="application/zip",
                       icon="⬇️", key=f"download_{run_id}",
                       help="The store's export file: import it on another machine")


def upload_run_widget(key: str = "import") -> int | None:
    """Import a trace file; returns the new run id once imported.

    A file that was imported before is not imported again on its own: the page names the run
    it became and offers "Import a copy anyway".
    """
    upload = st.file_uploader("Import a trace file (.kvtrace.zip)", type=["zip"], key=key)
    if upload is None:
        return None
    done = st.session_state.setdefault(f"{key}_done", {})
    token = f"{upload.name}:{upload.size}:{getattr(upload, 'file_id', '')}"
    copy_key = f"{key}_copy_of"  # set to the upload's token by the copy button
    if token not in done:  # a rerun must not import the same upload twice
        allow_copy = st.session_state.pop(copy_key, None) == token
        try:
            done[token] = _import_upload(upload, allow_copy=allow_copy)
        except DuplicateImportError as e:
            st.warning(f"{upload.name} is already imported as run #{e.run_id}; nothing was "
                       "added.", icon="♻️")
            replay_link(e.run_id, f"Open run #{e.run_id}")
            st.button("Import a copy anyway", key=f"{key}_copy", icon="➕",
                      on_click=st.session_state.__setitem__, args=(copy_key, token),
                      help="Add a second, identical run from this file")
            return None
        except StoreError as e:
            st.error(f"Cannot import {upload.name}: {e}")
            return None
        resources.refresh_runs()
    st.success(f"Imported {upload.name} as run #{done[token]}.")
    return done[token]


def _import_upload(upload: Any, *, allow_copy: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(upload.name).name
        path.write_bytes(upload.getvalue())
        return import_run(resources.get_store(), path, allow_copy=allow_copy)
