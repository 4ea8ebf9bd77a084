"""Widgets more than one page uses: the live-run panels, a run's summary and failure, run
picking, renaming and deleting, and a run's download (export) and upload (import)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from store import (
    DuplicateImportError,
    RunInfo,
    StoreError,
    delete_run,
    export_run,
    import_run,
    rename_run,
)
from ui import analysis, charts, resources
from ui import format as fmt
from ui.live_run import LiveRun
from ui.run_registry import REGISTRY

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
        st.page_link("app.py", label="Home", icon=":material/home:")
        st.page_link(EXPERIMENT_PAGE, label="Experiment", icon=":material/science:")
        st.page_link(REPLAY_PAGE, label="Replay", icon=":material/slideshow:")
        st.page_link(COMPARE_PAGE, label="Compare", icon=":material/compare_arrows:")
        st.page_link(QUALITY_PAGE, label="Quality", icon=":material/query_stats:")
        st.page_link(MLA_PAGE, label="MLA", icon=":material/compress:")
        st.page_link(HARDWARE_PAGE, label="Hardware", icon=":material/memory:")
        st.page_link(SWEEP_PAGE, label="Sweep", icon=":material/tune:")
        st.divider()
        _running_notice()


def _running_notice() -> None:
    """Runs still going on this server, whichever tab started them (their Stop is on
    Experiment)."""
    for live in REGISTRY.active(resources.db_url()):
        step = live.steps[-1].step if live.steps else 0
        st.caption(f"Running: #{live.run_id} {live.name or live.config.workload.name}, "
                   f"step {fmt.count(step)}")
        st.page_link(EXPERIMENT_PAGE, label="progress and Stop", icon=":material/stop_circle:")


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
    total = fmt.count(live.requests_total) if live.requests_total is not None else "?"
    step = live.steps[-1].step if live.steps else 0
    phase = "stopping" if live.stopping else live.phase
    return (f"{phase}: {fmt.count(live.requests_done)}/{total} requests done, step "
            f"{fmt.count(step)}, {fmt.duration(live.elapsed_s)}")


def live_run_panel(live: LiveRun, *, show_charts: bool = True, key: str = "live") -> None:
    """Progress, live charts and a Stop button, redrawn every second while the run goes on.

    Call it only when the page found the run not done. The fragment always polls, so a run
    that ends between the page's check and this call is still noticed: the whole page then
    reruns once, so it can show the summary (or move on). So does a run that got its id or
    changed phase (the page's header names both).
    """
    seen = (live.run_id, live.phase)

    @st.fragment(run_every=LIVE_REFRESH_S)
    def panel() -> None:
        if live.done or (live.run_id, live.phase) != seen:
            resources.refresh_runs()
            st.rerun(scope="app")
        cols = st.columns([5, 1])
        with cols[0]:
            st.progress(live.progress, text=_progress_text(live))
        with cols[1]:
            st.button("Stop", key=f"{key}_stop", on_click=live.stop, type="secondary",
                      disabled=live.done or live.stopping, width="stretch",
                      icon=":material/stop:",
                      help="End the run after this step; the trace so far is kept")
        if show_charts:
            live_charts(live.steps_frame())

    panel()


def other_runs_panel(runs: list[LiveRun], *, key: str = "others") -> None:
    """The other runs still going on this server, each with its progress and Stop."""
    for live in runs:
        name = live.name or live.config.workload.name
        st.markdown(f"**Run #{live.run_id if live.run_id is not None else '?'}: {name}**")
        live_run_panel(live, show_charts=False, key=f"{key}_{id(live)}")


def run_failure(error: str | None, details: str | None, *, what: str = "The run") -> None:
    """A failed run: one line saying what went wrong, and the traceback behind "details"."""
    st.error(f"{what} failed: {error or 'no reason was recorded'}", icon=":material/error:")
    if details:
        with st.expander("details"):
            st.code(details, language=None)


def error_line(details: str) -> str:
    """The last line of a stored traceback (the exception itself), for a one-line message."""
    lines = [line for line in details.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else details


def summary_metrics(summary: dict[str, Any]) -> None:
    """A run's headline figures (RunSummary) as metric tiles, formatted for people."""
    if not summary:
        st.info("No summary: the run did not finish.")
        return
    blocks = summary.get("num_blocks", 0)
    peak = summary.get("peak_blocks_used", 0)
    tiles = [
        ("output tokens/s", fmt.number(summary.get("output_tokens_per_s", 0))),
        ("prefix hit rate", fmt.percent(summary.get("prefix_hit_rate", 0))),
        ("requests done", f"{fmt.count(summary.get('num_finished', 0))} of "
                          f"{fmt.count(summary.get('num_requests', 0))}"),
        ("preemptions", fmt.count(summary.get("num_preemptions", 0))),
        ("evictions", fmt.count(summary.get("num_evictions", 0))),
        ("peak blocks in use", f"{fmt.count(peak)} of {fmt.count(blocks)}"
                               + (f" ({fmt.percent(peak / blocks, 0)})" if blocks else "")),
        ("steps", fmt.count(summary.get("steps", 0))),
        ("elapsed", fmt.duration(summary.get("elapsed_s", 0))),
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
    c = fmt.count
    return (
        f"**{c(r['num_running'])}** running, **{c(r['num_waiting'])}** waiting · "
        f"**{c(r['num_prefill_tokens'])}** prefill + **{c(r['num_decode_tokens'])}** decode "
        f"tokens  \n"
        f"blocks: **{c(r['blocks_used'])}** in use, **{c(r['blocks_cached_free'])}** free but "
        f"cached, **{c(r['blocks_free'] - r['blocks_cached_free'])}** free  \n"
        f"prefix cache: **{c(r['prefix_hit_tokens'])}** of {c(r['prefix_query_tokens'])} "
        f"looked-up tokens hit · **{c(r['num_evicted'])}** evicted · "
        f"**{c(r['num_preempted'])}** preempted · {fmt.duration(r['duration_s'])} at "
        f"{fmt.duration(r['t'])}"
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
    st.page_link(REPLAY_PAGE, label=label, icon=":material/play_arrow:",
                 query_params={"run": str(run_id)})


def manage_run(info: RunInfo, *, key: str = "manage") -> None:
    """Rename the run, or delete it after a confirmation."""
    confirm_key = f"{key}_confirm_delete"
    cols = st.columns([3, 1])
    with cols[0]:
        name = st.text_input("name", value=info.name or "", key=f"{key}_name_{info.run_id}",
                             max_chars=200, placeholder="no name")
    with cols[1]:
        st.write("")
        if st.button("Rename", icon=":material/edit:", key=f"{key}_rename",
                     disabled=(name.strip() or None) == info.name, width="stretch"):
            _store_action(lambda: rename_run(resources.get_store(), info.run_id, name),
                          f"Renamed run #{info.run_id}.")
    if not st.session_state.get(confirm_key):
        st.button("Delete this run", icon=":material/delete:", key=f"{key}_delete",
                  on_click=st.session_state.__setitem__, args=(confirm_key, True))
        return
    st.warning(f"Delete run #{info.run_id} {info.name or ''} and its whole trace? This cannot "
               "be undone (download the trace first to keep a copy).",
               icon=":material/warning:")
    yes, no = st.columns(2)
    if yes.button("Delete for good", type="primary", icon=":material/delete_forever:",
                  key=f"{key}_delete_yes", width="stretch"):
        st.session_state[confirm_key] = False
        if _store_action(lambda: delete_run(resources.get_store(), info.run_id), None):
            st.query_params.pop("run", None)
            st.rerun()
    no.button("Cancel", key=f"{key}_delete_no", width="stretch",
              on_click=st.session_state.__setitem__, args=(confirm_key, False))


def _store_action(action: Any, done: str | None) -> bool:
    try:
        action()
    except StoreError as e:
        st.error(str(e), icon=":material/error:")
        return False
    resources.refresh_runs()
    resources.run_info.clear()
    if done:
        st.toast(done, icon=":material/check_circle:")
    return True


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
                       icon=":material/download:", key=f"download_{run_id}",
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
                       "added.", icon=":material/content_copy:")
            replay_link(e.run_id, f"Open run #{e.run_id}")
            st.button("Import a copy anyway", key=f"{key}_copy", icon=":material/add:",
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
