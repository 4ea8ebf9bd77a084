"""The head of a step's LRU free queue, in eviction order, as data and as a Vega-Lite dict."""

from __future__ import annotations

import copy
import functools
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import pyarrow as pa

from engine.trace import BlockState
from ui.charts import STATE_COLOURS

QUEUE_DATA = "free_queue"  # the template's named dataset
MAX_QUEUE_CELLS = 256  # the head of the free queue that is drawn (next to be evicted first)
QUEUE_COLUMNS = 16


def free_queue_frame(state: BlockState, limit: int = MAX_QUEUE_CELLS) -> pd.DataFrame:
    """The head of the free queue in eviction order: position, block, cached or not."""
    head = state.free_queue[:limit]
    return pd.DataFrame(
        {"position": np.arange(len(head), dtype=np.int64),
         "block_id": np.asarray(head, dtype=np.int64),
         "state": ["free, cached" if state.block_hashes[b] is not None else "free"
                   for b in head]},
        columns=["position", "block_id", "state"])


def free_queue_caption(num_free: int, num_cached: int, limit: int = MAX_QUEUE_CELLS) -> str:
    """What the free queue holds (from the step's record: no walk over a long queue)."""
    shown = f" (the first {limit:,} drawn)" if num_free > limit else ""
    return (f"Free queue: {num_free:,} blocks, {num_cached:,} of them cached; the first is "
            f"reused (and evicted, if cached) next{shown}")


def free_queue_spec(queue: pd.DataFrame) -> dict[str, Any]:
    """The queue's head in reading order (first cell: evicted next), cached blocks in amber,
    as a Vega-Lite dict from a template (built once: a step's redraw only swaps the data)."""
    spec = copy.deepcopy(_queue_template())
    spec["datasets"] = {QUEUE_DATA: pa.Table.from_pandas(queue, preserve_index=False)}
    return spec


@functools.lru_cache(maxsize=1)
def _queue_template() -> dict[str, Any]:
    return _queue_chart(alt.NamedData(QUEUE_DATA), "Free queue, LRU first").to_dict()


def _queue_chart(data: pd.DataFrame | alt.NamedData, title: str) -> alt.LayerChart:
    # Wrapped in rows of QUEUE_COLUMNS, read left to right, top to bottom, like text.
    base = alt.Chart(data, width=alt.Step(20), height=alt.Step(20)
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
    return alt.layer(rects, text).properties(title=title)
