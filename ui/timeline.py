"""The request timeline: request events -> (request, state, start, end) segments -> Gantt chart."""

from __future__ import annotations

import json

import altair as alt
import pandas as pd

TIMELINE_COLOURS = {"waiting": "#9ca3af", "running": "#2563eb", "preempted": "#dc2626"}
_NEXT_STATE = {"arrive": "waiting", "schedule": "running", "preempt": "preempted",
               "finish": None}


def request_segments(events: pd.DataFrame, last_step: int) -> pd.DataFrame:
    """Life-cycle segments per request from arrive/schedule/preempt/finish events.

    A preempted request waits to be rescheduled, drawn as its own state so recompute preemption
    stands out. Segments still open at the end run to `last_step` (an interrupted run).
    """
    columns = ["request_id", "state", "start", "end"]
    if events.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    ordered = events.sort_values(["request_id", "step"], kind="stable")
    for request_id, group in ordered.groupby("request_id", sort=True):
        state, start = None, None
        for step, kind in zip(group["step"], group["kind"], strict=True):
            if kind not in _NEXT_STATE:
                continue  # first_token: a point, not a state change
            if state is not None:
                rows.append((request_id, state, start, step))
            state, start = _NEXT_STATE[kind], step
        if state is not None:
            rows.append((request_id, state, start, max(last_step, start)))
    seg = pd.DataFrame(rows, columns=columns)
    seg["end"] = seg["end"].where(seg["end"] > seg["start"], seg["start"] + 0.5)
    return seg


def request_timeline_chart(segments: pd.DataFrame, *, title: str = "requests") -> alt.Chart:
    """One row per request, bars coloured waiting / running / preempted (Replay layers its
    step's rule on with ui.charts.with_step_rule)."""
    n = segments["request_id"].nunique() if not segments.empty else 1
    row = max(3, min(14, 600 // n))  # px per request: a discrete step (see ui.block_grid)
    order = list(TIMELINE_COLOURS)
    # Inline values, not a DataFrame: a long run has more segments than Altair's 5,000-row
    # default limit, and the data goes to the browser once per run anyway.
    values = alt.Data(values=json.loads(segments.to_json(orient="records")))
    return alt.Chart(values, title=title, height=alt.Step(row)).mark_bar().encode(
        x=alt.X("start:Q", title="step"),
        x2="end:Q",
        y=alt.Y("request_id:O", title="request", axis=alt.Axis(labels=n <= 60)),
        color=alt.Color("state:N", scale=alt.Scale(domain=order,
                        range=[TIMELINE_COLOURS[s] for s in order]),
                        legend=alt.Legend(orient="bottom", title=None)),
        tooltip=[alt.Tooltip("request_id:Q"), alt.Tooltip("state:N"), alt.Tooltip("start:Q"),
                 alt.Tooltip("end:Q")],
    )
