"""The request timeline: request events -> (request, state, start, end) segments -> charts.

Readable at any number of requests: a Gantt chart of one page of requests (PAGE_SIZE rows) and,
for the whole run, the number of requests waiting / running / preempted at each step. Segments
are computed with array operations, so a 20,000-request run costs milliseconds, not seconds.
"""

from __future__ import annotations

import json
import math

import altair as alt
import numpy as np
import pandas as pd

from ui.charts import stacked_state_area

TIMELINE_COLOURS = {"waiting": "#9ca3af", "running": "#2563eb", "preempted": "#dc2626"}
_NEXT_STATE = {"arrive": "waiting", "schedule": "running", "preempt": "preempted",
               "finish": None}
PAGE_SIZE = 50  # requests per page of the Gantt chart
SEGMENT_COLUMNS = ["request_id", "state", "start", "end"]


def request_segments(events: pd.DataFrame, last_step: int) -> pd.DataFrame:
    """Life-cycle segments per request from arrive/schedule/preempt/finish events.

    A preempted request waits to be rescheduled, drawn as its own state so recompute preemption
    stands out. Segments still open at the end run to `last_step` (an interrupted run).
    """
    if events.empty:
        return pd.DataFrame(columns=SEGMENT_COLUMNS)
    changes = events[events["kind"].isin(list(_NEXT_STATE))]
    ordered = changes.sort_values(["request_id", "step"], kind="stable")
    rid = ordered["request_id"].to_numpy(dtype=np.int64)
    step = ordered["step"].to_numpy(dtype=np.float64)
    kind = ordered["kind"].to_numpy(dtype=object)
    same_next = np.r_[rid[1:] == rid[:-1], False]
    end = np.where(same_next, np.r_[step[1:], 0.0], np.maximum(float(last_step), step))
    keep = kind != "finish"  # a finish closes a segment and opens none
    state = np.array([_NEXT_STATE[k] for k in kind[keep]], dtype=object)
    seg = pd.DataFrame({"request_id": rid[keep], "state": state.astype(str),
                        "start": step[keep], "end": end[keep]})
    seg["end"] = seg["end"].where(seg["end"] > seg["start"], seg["start"] + 0.5)
    for col in ("start", "end"):
        if (seg[col] == seg[col].round()).all():
            seg[col] = seg[col].astype(np.int64)
    return seg.reset_index(drop=True)


def num_pages(segments: pd.DataFrame, per_page: int = PAGE_SIZE) -> int:
    n = segments["request_id"].nunique() if not segments.empty else 0
    return max(1, math.ceil(n / per_page))


def page_of(segments: pd.DataFrame, page: int, per_page: int = PAGE_SIZE
            ) -> tuple[pd.DataFrame, int, int]:
    """The segments of page `page` (from 1) of requests in id order, and the first and last
    position (from 1) of its requests among all."""
    ids = np.sort(segments["request_id"].unique()) if not segments.empty else np.array([])
    lo = (page - 1) * per_page
    wanted = ids[lo:lo + per_page]
    shown = segments[segments["request_id"].isin(wanted)]
    return shown, lo + 1, lo + len(wanted)


def state_counts(segments: pd.DataFrame, last_step: int) -> pd.DataFrame:
    """Long frame (step, state, requests): how many requests are in each state at each step
    (a segment [start, end) counts at the steps it covers)."""
    steps = np.arange(0, max(0, int(last_step)) + 1)
    parts = []
    for state in TIMELINE_COLOURS:
        seg = segments[segments["state"] == state]
        delta = np.zeros(len(steps) + 1)
        start = np.clip(np.ceil(seg["start"].to_numpy(dtype=float)), 0, len(steps)).astype(int)
        end = np.clip(np.ceil(seg["end"].to_numpy(dtype=float)), 0, len(steps)).astype(int)
        np.add.at(delta, start, 1)
        np.add.at(delta, end, -1)
        parts.append(pd.DataFrame({"step": steps, "state": state,
                                   "requests": np.cumsum(delta)[:-1].astype(np.int64)}))
    return pd.concat(parts, ignore_index=True)


def _values(frame: pd.DataFrame) -> alt.Data:
    # Inline values, not a DataFrame: Altair refuses frames over 5,000 rows, and the data goes
    # to the browser once per run (or page) anyway.
    return alt.Data(values=json.loads(frame.to_json(orient="records")))


def request_timeline_chart(segments: pd.DataFrame, *, title: str = "requests",
                           data: alt.NamedData | None = None) -> alt.Chart:
    """One row per request, bars coloured waiting / running / preempted (Replay layers its
    step's rule on with ui.charts.with_step_rule). Meant for one page of requests. With
    `data`, the chart reads that named dataset (the caller supplies `segments` there)."""
    n = segments["request_id"].nunique() if not segments.empty else 1
    row = max(3, min(14, 600 // n))  # px per request: a discrete step (see ui.block_grid)
    order = list(TIMELINE_COLOURS)
    source = data if data is not None else _values(segments)
    return alt.Chart(source, title=title, height=alt.Step(row)).mark_bar().encode(
        x=alt.X("start:Q", title="step"),
        x2="end:Q",
        y=alt.Y("request_id:O", title="request", axis=alt.Axis(labels=n <= 60)),
        color=alt.Color("state:N", scale=alt.Scale(domain=order,
                        range=[TIMELINE_COLOURS[s] for s in order]),
                        legend=alt.Legend(orient="bottom", title=None)),
        tooltip=[alt.Tooltip("request_id:Q", title="request"), alt.Tooltip("state:N"),
                 alt.Tooltip("start:Q"), alt.Tooltip("end:Q")],
    )


def state_counts_chart(counts: pd.DataFrame | alt.NamedData, *,
                       title: str = "requests by state") -> alt.Chart:
    """Stacked area of the requests waiting / running / preempted at each step (a frame from
    `state_counts`, or the name of a dataset holding one)."""
    source = counts if isinstance(counts, alt.NamedData) else _values(counts)
    return stacked_state_area(source, TIMELINE_COLOURS, "requests", title=title)
