"""Time-series chart builders: DataFrame in, `alt.Chart` out.

Every builder takes the frame ui.analysis produced. Replay's charts follow its slider through
`with_step_rule`, which layers the current step as a red rule onto a spec built once per run;
the live panel redraws its charts every second from templates (`live_spec`).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import altair as alt
import pandas as pd
import pyarrow as pa

from ui.analysis import SERIES_LABELS

STATE_COLOURS = {"in use": "#2563eb", "free, cached": "#f59e0b", "free": "#d1d5db"}
# No fixed heights: Streamlit fits charts to their container, and a spec height there squeezes
# the plot once the legend and axes take their share.


# Keys of a single-view spec that move into its first layer when a rule is layered on top.
_VIEW_KEYS = ("mark", "encoding", "transform", "data", "params")
STEP_RULE_DATA = "step_rule"  # the named dataset that holds the rule's one row


def with_step_rule(spec: dict[str, Any], step: float, color: str = "#dc2626", *,
                   field: str = "step") -> dict[str, Any]:
    """A copy of a Vega-Lite spec (from `alt.Chart.to_dict()`) with a rule at `step` on top
    (`field` "t" and the step's time for a chart over time).

    Replay draws the whole run's charts at every slider move; building them once per run and
    adding the rule as plain data keeps a jump to any step far below a second (Altair's
    validation alone costs tens of milliseconds per chart). The step goes in a named dataset,
    not in the spec: Streamlit sends named datasets apart from the spec, and the browser
    rebuilds a chart whose spec text changed (parse, compile, draw: the bulk of a slider move
    with several charts on a busy CPU) but only swaps the data of one whose spec is the same.
    The row is an Arrow table, which Streamlit serialises without a detour through pandas.
    """
    out = dict(spec)
    rule = {"mark": {"type": "rule", "color": color, "strokeWidth": 2},
            "data": {"name": STEP_RULE_DATA},
            "encoding": {"x": {"field": field, "type": "quantitative"}}}
    if "layer" in out:
        out["layer"] = [*out["layer"], rule]
    else:
        view = {k: out.pop(k) for k in _VIEW_KEYS if k in out}
        out["layer"] = [view, rule]
    out["datasets"] = {**out.get("datasets", {}), STEP_RULE_DATA: pa.table({field: [step]})}
    return out


X_TITLES = {"step": "step", "t": "time (s)"}


def series_chart(df: pd.DataFrame | alt.NamedData, column: str, *, title: str | None = None,
                 x: str = "step") -> alt.Chart:
    """One per-step series of one run as a line, over steps or (`x="t"`) over time (from a
    frame, or a named dataset with the columns step, `x` and `column`)."""
    cols = list(dict.fromkeys(["step", x, column]))
    if isinstance(df, alt.NamedData):
        data: pd.DataFrame | alt.NamedData = df
    else:
        data = df[cols] if not df.empty else pd.DataFrame({c: [] for c in cols})
    return _series_chart(data, column, title or SERIES_LABELS.get(column, column), x)


def _series_chart(data: pd.DataFrame | alt.NamedData, column: str, label: str,
                  x: str = "step") -> alt.Chart:
    return (
        alt.Chart(data, title=label)
        .mark_line(interpolate="step-after")
        .encode(
            x=alt.X(f"{x}:Q", title=X_TITLES[x]),
            y=alt.Y(f"{column}:Q", title=None, axis=alt.Axis(format=",.4~r")),
            tooltip=[alt.Tooltip("step:Q"),
                     alt.Tooltip(f"{column}:Q", title=label, format=",.3~f")],
        )
    )


def per_step_chart(long: pd.DataFrame | alt.NamedData, title: str, *, stacked: bool,
                   x: str = "step") -> alt.Chart:
    """Several per-step series of one run (ui.analysis.per_step_long): stacked areas (parts of
    one whole, e.g. prefill and decode tokens) or lines (e.g. tokens looked up and hit)."""
    mark = (alt.Chart(long, title=title).mark_area(interpolate="step-after", opacity=0.85)
            if stacked else alt.Chart(long, title=title).mark_line(interpolate="step-after"))
    return mark.encode(
        x=alt.X(f"{x}:Q", title=X_TITLES[x]),
        y=alt.Y("value:Q", title=None, stack="zero" if stacked else None,
                axis=alt.Axis(format=",.4~r")),
        color=alt.Color("series:N", legend=alt.Legend(orient="bottom", title=None)),
        tooltip=[alt.Tooltip("step:Q"), alt.Tooltip("series:N"),
                 alt.Tooltip("value:Q", format=",.0f")],
    )


def block_mix_chart(mix: pd.DataFrame | alt.NamedData, *, title: str = "KV blocks",
                    x: str = "step") -> alt.Chart:
    """Stacked area of blocks in use / free but cached / free per step (ui.analysis.block_mix)."""
    return stacked_state_area(mix, STATE_COLOURS, "blocks", title=title, x=x)


def stacked_state_area(source: pd.DataFrame | alt.Data | alt.NamedData, colours: dict[str, str],
                       count: str, *, title: str, x: str = "step") -> alt.Chart:
    """Stacked step-area of `count` per `state` along x, stacked and coloured in the order of
    `colours` (state -> colour): the block mix here, the requests by state in ui/timeline.py."""
    order = list(colours)
    return (
        alt.Chart(source, title=title)
        .mark_area(interpolate="step-after")
        .encode(
            x=alt.X(f"{x}:Q", title=X_TITLES[x]),
            y=alt.Y(f"{count}:Q", stack="zero", title=count),
            color=alt.Color("state:N", scale=alt.Scale(domain=order,
                            range=[colours[s] for s in order]),
                            legend=alt.Legend(orient="bottom", title=None)),
            order=alt.Order("state_order:Q"),
            tooltip=["step:Q", "state:N", f"{count}:Q"],
        )
        .transform_calculate(state_order=f"indexof({order!r}, datum.state)")
    )


LIVE_DATA = "rows"  # the named dataset of live_spec's templates


def live_spec(name: str, rows: pd.DataFrame) -> dict[str, Any]:
    """`series_chart(rows, name)`, or for "blocks" `block_mix_chart(rows)`, as a Vega-Lite dict.

    From a template built once per name: the live panel redraws its charts every second, and
    Altair's building and validation were most of that (tens of ms per chart). The spec text
    also stays the same from tick to tick, so the browser swaps the data instead of rebuilding
    each chart.
    """
    spec = copy.deepcopy(_live_template(name))  # Streamlit edits the spec it is given
    columns = ["step", "state", "blocks"] if name == "blocks" else ["step", name]
    spec["datasets"] = {LIVE_DATA: pa.Table.from_pandas(rows[columns], preserve_index=False)}
    return spec


@functools.lru_cache(maxsize=32)
def _live_template(name: str) -> dict[str, Any]:
    data = alt.NamedData(LIVE_DATA)
    if name == "blocks":
        return block_mix_chart(data).to_dict()
    return _series_chart(data, name, SERIES_LABELS.get(name, name)).to_dict()


# Eight clearly different colours (Tableau 10 without its grey and olive), one per run.
RUN_COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
               "#ff9da7"]


def run_colours(runs: list[str]) -> alt.Color:
    """A colour per run in the order given, and a legend that lists every run's full name
    one a line (no truncation, however long)."""
    return alt.Color("run:N", scale=alt.Scale(domain=runs, range=RUN_COLOURS[:max(1, len(runs))]),
                     legend=alt.Legend(orient="bottom", title=None, labelLimit=0,
                                       direction="vertical", symbolLimit=0))


def overlay_chart(df: pd.DataFrame, column: str, *, title: str | None = None) -> alt.Chart:
    """The same series of several runs (ui.analysis.stack_runs), one colour per run."""
    label = title or SERIES_LABELS.get(column, column)
    runs = list(dict.fromkeys(df["run"])) if "run" in df else []
    return (
        alt.Chart(df[["run", "step", column]], title=label)
        .mark_line(interpolate="step-after")
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y(f"{column}:Q", title=None, axis=alt.Axis(format=",.4~r")),
            color=run_colours(runs),
            tooltip=["run:N", "step:Q", alt.Tooltip(f"{column}:Q", format=",.3~f")],
        )
    )


def percentile_chart(table: pd.DataFrame, metric: str) -> alt.Chart:
    """Grouped bars of p50/p90/p99 for TTFT or TPOT (ui.analysis.latency_percentiles)."""
    cols = [c for c in table.columns if c.startswith(metric)]
    long = table.melt("run", value_vars=cols, var_name="percentile", value_name="ms")
    long["percentile"] = long["percentile"].str.extract(r"(p\d+)", expand=False)
    runs = list(dict.fromkeys(table["run"]))
    return (
        alt.Chart(long, title=f"{metric} (ms)")
        .mark_bar()
        .encode(
            x=alt.X("percentile:N", title=None),
            xOffset="run:N",
            y=alt.Y("ms:Q", title="ms"),
            color=run_colours(runs),
            tooltip=["run:N", "percentile:N", alt.Tooltip("ms:Q", format=",.1f")],
        )
    )


def sweep_chart(points: pd.DataFrame, x: str, y: str, color: str | None = None, *,
                x_title: str | None = None, y_title: str | None = None) -> alt.LayerChart:
    """A sweep's summary metric `y` against axis `x`, one line per value of axis `color`.

    Every point is a dot (repeats show their spread); the line joins the mean at each x. A
    numeric axis spanning 16x or more (byte budgets, block counts) gets a log scale.
    """
    columns = ["point", "run_id", x, y] + ([color] if color and color != x else [])
    data = points[columns].dropna(subset=[y]).copy()
    numeric = pd.api.types.is_numeric_dtype(data[x]) and data[x].notna().all()
    if not numeric:
        data[x] = data[x].astype(str)
    scale = alt.Scale(type="log") if numeric and _spans(data[x], 16) else alt.Scale(zero=False)
    x_enc = alt.X(f"{x}:{'Q' if numeric else 'O'}", title=x_title or x, scale=scale)
    encodings: dict[str, Any] = {"x": x_enc}
    tooltip = [alt.Tooltip("point:O"), alt.Tooltip("run_id:O", title="run"),
               alt.Tooltip(f"{x}:{'Q' if numeric else 'N'}", title=x_title or x),
               alt.Tooltip(f"{y}:Q", title=y_title or y, format=",.3~f")]
    if color and color != x:
        data[color] = data[color].astype(str)
        encodings["color"] = alt.Color(f"{color}:N", title=color,
                                       legend=alt.Legend(orient="bottom"))
        tooltip.insert(3, alt.Tooltip(f"{color}:N"))
    base = alt.Chart(data)
    line = base.mark_line().encode(y=alt.Y(f"mean({y}):Q", title=y_title or y), **encodings)
    dots = base.mark_point(filled=True, size=70).encode(
        y=alt.Y(f"{y}:Q", title=y_title or y), tooltip=tooltip, **encodings)
    return alt.layer(line, dots).properties(title=f"{y_title or y} vs {x_title or x}")


def _spans(values: pd.Series, ratio: float) -> bool:
    positive = values[values > 0]
    return len(positive) == len(values) and positive.max() >= ratio * positive.min()
