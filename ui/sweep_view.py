"""The Sweep page's widgets: the live progress panel, picking a sweep, and its results (a
metric against an axis coloured by another, the table of points with their replays, the
download of the whole sweep)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from store.sweeps import export_sweep
from sweep.spec import format_value
from ui import charts, resources
from ui.live_sweep import LiveSweep
from ui.widgets import REPLAY_PAGE

REPLAY_URL = "/Replay?run={}"  # the URL Streamlit gives pages/2_Replay.py
LIVE_REFRESH_S = 1.0
# RunSummary fields worth plotting, with the label a person reads.
SWEEP_METRICS = {
    "output_tokens_per_s": "output tokens/s", "prefix_hit_rate": "prefix hit rate",
    "num_preemptions": "preemptions", "num_evictions": "evictions",
    "peak_blocks_used": "peak blocks used", "num_blocks": "KV blocks",
    "elapsed_s": "elapsed (s)", "steps": "steps", "num_finished": "requests finished",
    "num_rejected": "requests rejected", "output_tokens": "output tokens",
    "kv_bytes_per_token": "KV bytes per token",
}
TABLE_METRICS = ("output_tokens_per_s", "prefix_hit_rate", "num_preemptions", "num_evictions")


def live_sweep_panel(live: LiveSweep) -> None:
    """Progress and a Stop button, redrawn every second; the whole page reruns once the sweep
    ends so the results show it."""

    @st.fragment(run_every=LIVE_REFRESH_S)
    def panel() -> None:
        if live.done:
            resources.refresh_sweeps()
            st.rerun(scope="app")
        cols = st.columns([5, 1])
        with cols[0]:
            st.progress(live.fraction, text=live.progress_text())
        with cols[1]:
            st.button("Stop", key="sweep_stop", on_click=live.stop, disabled=live.stopping,
                      width="stretch", help="Cancel the points not run yet; running points "
                      "stop after their current step and are kept as interrupted")

    panel()


def live_outcome(live: LiveSweep) -> None:
    p = live.progress
    if live.phase == "failed":
        st.error(f"Sweep #{live.sweep_id} failed: {live.error}", icon=":material/error:")
    elif live.phase == "interrupted":
        st.warning(f"Sweep #{live.sweep_id} stopped: {p.done} points finished and are kept; "
                   f"`python cli.py sweep --resume {live.sweep_id}` runs the rest.",
                   icon=":material/stop_circle:")
    else:
        st.success(f"Sweep #{live.sweep_id} finished: {p.done} points, {p.failed} failed, in "
                   f"{p.elapsed_s:.0f} s.", icon=":material/check_circle:")


def pick_sweep(sweeps: pd.DataFrame, key: str = "sweep_pick") -> int | None:
    """A sweep selector; the `sweep` query parameter (a shared link) preselects."""
    if sweeps.empty:
        return None
    labels = {int(r.sweep_id): f"#{r.sweep_id} {r.name or ''} ({r.status}, {r.points} points: "
                               f"{r.axes})" for r in sweeps.itertuples()}
    wanted = st.query_params.get("sweep")
    if wanted and wanted.isdigit() and int(wanted) in labels and key not in st.session_state:
        st.session_state[key] = int(wanted)
    if st.session_state.get(key) not in labels:
        st.session_state[key] = next(iter(labels))
    sweep_id = st.selectbox("sweep", list(labels), key=key, format_func=labels.get)
    st.query_params["sweep"] = str(sweep_id)
    return sweep_id


def plot_frame(points: pd.DataFrame, axes: list[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Points ready to plot, and a title per axis: byte budgets in MiB."""
    df, titles = points.copy(), {a: a for a in axes}
    for axis in axes:
        if axis in ("kv_budget", "kv_budget_bytes") and pd.api.types.is_numeric_dtype(df[axis]):
            df[axis] = df[axis] / 2**20
            titles[axis] = "KV budget (MiB)"
    return df, titles


def sweep_results(sweep_id: int, row: pd.Series) -> None:
    """Counts, the trade-off chart, the table of points and the download."""
    axes = [a for a in str(row["axes"]).split(", ") if a]
    points = resources.sweep_points(sweep_id, f"{row['status']}/{row['finished']}/"
                                              f"{row['failed']}/{row['running']}")
    cols = st.columns(5)
    for col, (label, value) in zip(cols, (
            ("points", row["points"]), ("finished", row["finished"]), ("failed", row["failed"]),
            ("running", row["running"]), ("not run", row["pending"] + row["interrupted"])),
            strict=True):
        col.metric(label, int(value))
    finished = points[points["status"] == "finished"]
    metrics = [m for m in SWEEP_METRICS if m in finished.columns and m not in axes]
    if finished.empty or not metrics or not axes:
        st.info("No finished points to plot yet.")
    else:
        _chart(finished, axes, metrics)
    _points_table(points, axes)
    _replay_picker(points)
    st.download_button("Download the sweep (zip of every run)", lambda: _export(sweep_id),
                       file_name=f"sweep-{sweep_id}.zip", mime="application/zip",
                       icon=":material/download:",
                       key=f"sweep_download_{sweep_id}",
                       help="manifest.json, points.csv and each run's .kvtrace.zip "
                            "(`cli.py import` takes those one by one)")


def _chart(finished: pd.DataFrame, axes: list[str], metrics: list[str]) -> None:
    c = st.columns(3)
    with c[0]:
        metric = st.selectbox("metric", metrics, key="sweep_metric",
                              format_func=lambda m: SWEEP_METRICS.get(m, m))
    with c[1]:
        x = st.selectbox("against", axes, key="sweep_x")
    with c[2]:
        others = ["none", *[a for a in axes if a != x]]
        color = st.selectbox("colour by", others, index=min(1, len(others) - 1),
                             key="sweep_color")
    df, titles = plot_frame(finished, axes)
    chart = charts.sweep_chart(df, x, metric, None if color == "none" else color,
                               x_title=titles[x], y_title=SWEEP_METRICS.get(metric, metric))
    st.altair_chart(chart, width="stretch")


def _points_table(points: pd.DataFrame, axes: list[str]) -> None:
    table = points.copy()
    for axis in axes:  # sizes as typed (4MiB), not bytes
        if axis in ("kv_budget", "kv_budget_bytes"):
            table[axis] = [format_value(axis, v) if pd.notna(v) else None for v in table[axis]]
    table["error"] = table["error"].fillna("")
    table["replay"] = [REPLAY_URL.format(r) if pd.notna(r) else None for r in table["run_id"]]
    wanted = ["point", *axes, "repeat", "status", "replay", *TABLE_METRICS, "attempts", "error"]
    if table["repeat"].max() == 0:
        wanted.remove("repeat")
    st.dataframe(table[[c for c in wanted if c in table.columns]], hide_index=True,
                 width="stretch", column_config={
                     "replay": st.column_config.LinkColumn("replay", display_text=r"run=(\d+)"),
                     "output_tokens_per_s": st.column_config.NumberColumn("tokens/s",
                                                                          format="%.1f"),
                     "prefix_hit_rate": st.column_config.NumberColumn(format="%.2f")})


def _replay_picker(points: pd.DataFrame) -> None:
    with_runs = points[points["run_id"].notna()]
    if with_runs.empty:
        return
    labels = {int(r.run_id): f"point {r.point}: run #{r.run_id} ({r.status})"
              for r in with_runs.itertuples()}
    left, right = st.columns([3, 1])
    with left:
        run_id = st.selectbox("open a point's replay", list(labels), format_func=labels.get,
                              key="sweep_replay_pick")
    with right:
        st.write("")
        st.page_link(REPLAY_PAGE, label=f"Replay run #{run_id}", icon=":material/play_arrow:",
                     query_params={"run": str(run_id)})


def _export(sweep_id: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = export_sweep(resources.get_store(), sweep_id, Path(tmp) / "sweep.zip")
        return path.read_bytes()
