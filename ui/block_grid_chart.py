"""The block grid of one step as a Vega-Lite dict (ui/block_grid.py builds its frame).

A cell per KV block, coloured by state; a dot on the blocks that changed in the step; an
outline around the block tables of the request being inspected; a ref count written on shared
blocks; lane titles for runs with several KV cache groups. The chart is a template built once
per layout, so a step's redraw only swaps its data and the browser keeps the chart.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import altair as alt
import pandas as pd
import pyarrow as pa

from ui.block_grid import STATES, GridLayout
from ui.charts import STATE_COLOURS

GRID_DATA = "blocks"  # the template's named dataset
CHANGE_COLOURS = {"allocated": "#16a34a", "prefix hit": "#7c3aed", "cached": "#0891b2",
                  "freed": "#111827", "evicted": "#dc2626", "dropped": "#db2777"}


def block_grid_spec(frame: pd.DataFrame, layout: GridLayout) -> dict[str, Any]:
    """The grid as a Vega-Lite dict from a template built once per layout (so a step's redraw
    only swaps the data: the browser keeps the chart). The frame goes as an Arrow table."""
    spec = copy.deepcopy(_grid_template(layout.aggregated, layout.columns, layout.rows,
                                        layout.height_px))
    spec["datasets"] = {GRID_DATA: pa.Table.from_pandas(frame, preserve_index=False)}
    return spec


@functools.lru_cache(maxsize=64)
def _grid_template(aggregated: bool, cols: int, rows: int, height: int) -> dict[str, Any]:
    return _grid_chart(alt.NamedData(GRID_DATA), aggregated, cols, rows, height).to_dict()


def _grid_chart(data: Any, aggregated: bool, cols: int, rows: int, height: int) -> alt.LayerChart:
    # Every layer states the same scales: Vega-Lite 5 fails to merge a reversed scale with a
    # layer's default one (and Streamlit then draws nothing).
    x_scale = alt.Scale(domain=[0, cols], nice=False, zero=False)
    y_scale = alt.Scale(domain=[0, rows], nice=False, zero=False, reverse=True)

    def x(field: str) -> alt.X:
        return alt.X(f"{field}:Q", axis=None, scale=x_scale)

    def y(field: str) -> alt.Y:
        return alt.Y(f"{field}:Q", axis=None, scale=y_scale)

    base = alt.Chart(data)
    cells = base.transform_filter("datum.block_id >= 0")
    rects = cells.mark_rect().encode(
        x=x("xa"), x2="xb:Q", y=y("ya"), y2="yb:Q",
        color=alt.Color("state:N", scale=alt.Scale(domain=STATES,
                        range=[STATE_COLOURS[s] for s in STATES]),
                        legend=alt.Legend(orient="bottom", title=None)),
        opacity=alt.condition("datum.ref_count > 1 || datum.blocks > 1", alt.value(1.0),
                              alt.value(0.75)),
        tooltip=_range_tooltip() if aggregated else _block_tooltip(),
    )
    first = cells.transform_filter("datum.first == 1")
    outline = first.transform_filter("datum.hl == 1").mark_rect(
        filled=False, stroke="#111827", strokeWidth=2).encode(
        x=x("xa"), x2="xb:Q", y=y("y"), y2="y_end:Q").transform_calculate(y_end="datum.y + 1")
    marks = first.transform_filter("datum.changed > 0").transform_calculate(
        cx="datum.x + 0.78", cy="datum.y + 0.26").mark_point(filled=True, size=18).encode(
        x=x("cx"), y=y("cy"),
        # fill, not color: a second colour scale (resolved independently) kept Streamlit's
        # Vega-Lite from drawing the chart at all
        fill=alt.Fill("change:N", scale=alt.Scale(domain=list(CHANGE_COLOURS),
                      range=list(CHANGE_COLOURS.values())),
                      legend=alt.Legend(orient="top", title="this step")),
        tooltip=_range_tooltip() if aggregated else _block_tooltip())
    layers = [rects, outline, marks]
    if not aggregated:
        layers.append(first.mark_text(fontSize=9, color="white").encode(
            x=x("xm"), y=y("ym"), text="label:N"))
    lanes = base.transform_filter("datum.block_id < 0").mark_text(
        align="left", baseline="middle", fontSize=11, fontWeight="bold").encode(
        x=x("x"), y=y("ya"), text="lane:N")
    # fit-x: the width follows the column, the height stays the rows' (Streamlit's default
    # "fit" squeezed the cells into a strip once the legends took their share)
    return alt.layer(*layers, lanes).properties(
        height=height, autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))


def _block_tooltip() -> list[alt.Tooltip]:
    return [alt.Tooltip("block_id:Q", title="block"), alt.Tooltip("state:N"),
            alt.Tooltip("ref_count:Q", title="ref count"), alt.Tooltip("holders:N",
                                                                      title="held by"),
            alt.Tooltip("tokens:N"), alt.Tooltip("text:N"), alt.Tooltip("hash:N"),
            alt.Tooltip("parent:N", title="parent's hash"),
            alt.Tooltip("group:N", title="KV cache group"),
            alt.Tooltip("change_text:N", title="this step")]


def _range_tooltip() -> list[alt.Tooltip]:
    return [alt.Tooltip("block_id:Q", title="from block"),
            alt.Tooltip("last_block:Q", title="to block"), alt.Tooltip("blocks:Q"),
            alt.Tooltip("in_use:Q", title="in use"),
            alt.Tooltip("cached:Q", title="free, cached"), alt.Tooltip("free:Q"),
            alt.Tooltip("changed:Q", title="changed this step")]
