"""The block grid and the LRU free queue of one step: BlockState -> DataFrame -> `alt.Chart`.

A cell per KV block: grey when free, amber when free but still hashed (a prefix hit can revive
it until it is evicted), blue when in use, darker the more requests share it. A run with several
KV cache groups draws one lane per group (a block id holds one group's layers at a time).
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import altair as alt
import pandas as pd

from engine.config import RunConfig
from engine.trace import BlockState
from ui.charts import STATE_COLOURS

GRID_DATA = "blocks"  # the templates' named datasets
QUEUE_DATA = "free_queue"
MAX_QUEUE_CELLS = 256  # the head of the free queue that is drawn (next to be evicted first)
QUEUE_COLUMNS = 16


def grid_columns(num_blocks: int) -> int:
    """A roughly 2:1 grid, between 8 and 64 cells wide."""
    return max(8, min(64, 2 ** math.ceil(math.log2(max(1, math.sqrt(num_blocks * 2))))))


def block_frame(state: BlockState, columns: int | None = None,
                group_labels: dict[int, str] | None = None) -> pd.DataFrame:
    """One row per block: position in the grid, state, ref count, owner, hash, group.

    With one KV cache group the grid is laid out by block id. With several, each group gets a
    lane of the blocks it holds (in use or cached), in id order under a header row naming it
    (`group_labels`, e.g. "layers 0-14"), and a last lane holds the free blocks no group has;
    header rows carry the lane's title in `lane` and no block."""
    groups = sorted({g for g in state.groups if g is not None} | set(group_labels or ()))
    if len(groups) <= 1:
        cols = columns or grid_columns(len(state.ref_counts))
        rows = [_block_row(state, b, b % cols, b // cols) for b in range(len(state.ref_counts))]
        return pd.DataFrame(rows, columns=_COLUMNS)
    cols = columns or grid_columns(len(state.ref_counts))
    lanes: dict[int | None, list[int]] = {g: [] for g in groups}
    lanes[None] = []
    for b, g in enumerate(state.groups):
        lanes.setdefault(g, []).append(b)
    rows, y = [], 0
    for g, blocks in lanes.items():
        name = "free, no group" if g is None else (
            f"group {g}" + (f" · {group_labels[g]}" if group_labels and g in group_labels else ""))
        rows.append({**_HEADER, "y": y, "lane": f"{name} · {len(blocks)} blocks"})
        y += 1
        for i, b in enumerate(blocks):
            rows.append(_block_row(state, b, i % cols, y + i // cols))
        y += -(-len(blocks) // cols)
    return pd.DataFrame(rows, columns=_COLUMNS)


_COLUMNS = ["block_id", "x", "y", "state", "ref_count", "owner", "hash", "label", "group",
            "lane"]
_HEADER = {"block_id": -1, "x": 0, "state": None, "ref_count": 0, "owner": "", "hash": "",
           "label": "", "group": "", "lane": ""}


def group_labels(config: RunConfig) -> dict[int, str]:
    """Lane titles of a run's KV cache groups: their layers, and KV heads when split by head."""
    groups = config.kv_groups()
    split_heads = len({g.kv_heads for g in groups}) > 1
    return {g.group_id: f"layers {_span(g.layers)}"
            + (f", KV heads {_span(g.kv_heads)}" if split_heads else "") for g in groups}


def _span(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _block_row(state: BlockState, b: int, x: int, y: int) -> dict[str, Any]:
    ref = state.ref_counts[b]
    hashed = state.block_hashes[b] is not None
    owner, group = state.owners[b], state.groups[b]
    return {
        "block_id": b, "x": x, "y": y,
        "state": "in use" if ref > 0 else ("free, cached" if hashed else "free"),
        "ref_count": ref,
        "owner": "—" if owner is None or ref == 0 else f"request {owner}",
        "hash": (state.block_hashes[b] or "—")[:16],
        "label": str(ref) if ref > 1 else "",
        "group": "—" if group is None else str(group),
        "lane": "",
    }


def block_grid_spec(frame: pd.DataFrame, *, title: str = "KV blocks") -> dict[str, Any]:
    """The grid as a Vega-Lite dict: colour by state, opacity and a label by ref count, owner
    and hash on hover. From a template built once per grid shape, so Replay redraws the grid
    at each step without rebuilding (and revalidating) the chart."""
    spec = copy.deepcopy(_grid_template(_columns_of(frame)))  # Streamlit may edit it
    spec["title"] = title
    spec["datasets"] = {GRID_DATA: frame.to_dict("records")}
    return spec


def _columns_of(frame: pd.DataFrame) -> int:
    return int(frame["x"].max()) + 1 if not frame.empty else 1


@functools.lru_cache(maxsize=64)
def _grid_template(cols: int) -> dict[str, Any]:
    return _grid_chart(alt.NamedData(GRID_DATA), cols, "").to_dict()


def _grid_chart(data: pd.DataFrame | alt.NamedData, cols: int, title: str) -> alt.LayerChart:
    cell = max(10, min(22, 720 // cols))
    order = list(STATE_COLOURS)
    # Discrete sizes (a step per cell): a fixed pixel height on an ordinal axis collapses the
    # chart in Streamlit, which asks Vega-Lite to fit the container.
    base = alt.Chart(data, title=title, width=alt.Step(cell), height=alt.Step(cell))
    blocks = base.transform_filter("datum.block_id >= 0")  # lane header rows hold no block
    rects = blocks.mark_rect(stroke="white", strokeWidth=1).encode(
        x=alt.X("x:O", axis=None, scale=alt.Scale(domain=list(range(cols)))),
        y=alt.Y("y:O", axis=None),
        color=alt.Color("state:N", scale=alt.Scale(domain=order,
                        range=[STATE_COLOURS[s] for s in order]),
                        legend=alt.Legend(orient="bottom", title=None)),
        opacity=alt.condition("datum.ref_count > 1", alt.value(1.0), alt.value(0.75)),
        tooltip=[alt.Tooltip("block_id:Q", title="block"), alt.Tooltip("state:N"),
                 alt.Tooltip("ref_count:Q", title="ref count"), alt.Tooltip("owner:N"),
                 alt.Tooltip("hash:N"), alt.Tooltip("group:N", title="KV cache group")],
    )
    labels = blocks.mark_text(fontSize=max(7, cell // 2), color="white").encode(
        x="x:O", y="y:O", text="label:N")
    lanes = base.transform_filter("datum.block_id < 0").mark_text(
        align="left", baseline="middle", fontSize=11, fontWeight="bold", dx=-cell / 2).encode(
        x="x:O", y="y:O", text="lane:N")
    return alt.layer(rects, labels, lanes)


def free_queue_frame(state: BlockState) -> pd.DataFrame:
    """The free queue in eviction order (head first): position, block, cached or not."""
    return pd.DataFrame(
        [{"position": i, "block_id": b,
          "state": "free, cached" if state.block_hashes[b] is not None else "free"}
         for i, b in enumerate(state.free_queue)],
        columns=["position", "block_id", "state"],
    )


def free_queue_spec(queue: pd.DataFrame, *, limit: int = MAX_QUEUE_CELLS) -> dict[str, Any]:
    """The queue's head in reading order (first cell: evicted next), cached blocks in amber,
    as a Vega-Lite dict from a template (see block_grid_spec)."""
    head = queue.head(limit)
    spec = copy.deepcopy(_queue_template())
    spec["title"] = _queue_title(len(queue), limit)
    spec["datasets"] = {QUEUE_DATA: head.to_dict("records")}
    return spec


def _queue_title(n: int, limit: int) -> str:
    title = f"Free queue: {n} blocks, LRU first"
    return title + (f" ({limit} shown)" if n > limit else "")


@functools.lru_cache(maxsize=1)
def _queue_template() -> dict[str, Any]:
    return _queue_chart(alt.NamedData(QUEUE_DATA), "").to_dict()


def _queue_chart(data: pd.DataFrame | alt.NamedData, title: str) -> alt.LayerChart:
    # Wrapped in rows of QUEUE_COLUMNS, read left to right, top to bottom, like text.
    base = alt.Chart(data, title=title, width=alt.Step(20), height=alt.Step(20)
                     ).transform_calculate(col=f"datum.position % {QUEUE_COLUMNS}",
                                           row=f"floor(datum.position / {QUEUE_COLUMNS})")
    order = ["free, cached", "free"]
    rects = base.mark_rect(stroke="white").encode(
        x=alt.X("col:O", axis=None),
        y=alt.Y("row:O", axis=None),
        color=alt.Color("state:N", legend=None, scale=alt.Scale(
            domain=order, range=[STATE_COLOURS[s] for s in order])),
        tooltip=[alt.Tooltip("position:Q", title="position (0: evicted next)"),
                 alt.Tooltip("block_id:Q", title="block"), alt.Tooltip("state:N")],
    )
    text = base.mark_text(fontSize=8).encode(x="col:O", y="row:O", text="block_id:Q")
    return alt.layer(rects, text)
