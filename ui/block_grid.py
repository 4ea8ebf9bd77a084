"""The block grid of one step, as data: its layout (GridLayout, `plan`) and BlockState ->
DataFrame (`block_frame`). The chart drawn from that frame is ui/block_grid_chart.py; the LRU
free queue beside it is ui/free_queue.py.

A cell per KV block: grey when free, amber when free but still hashed (a prefix hit can revive
it until it is evicted), blue when in use, darker and numbered when several requests share it. A
dot marks the blocks that changed in the step (allocated, hit, cached, freed, evicted, dropped by
a retention policy); an outline marks the block tables of the request being inspected. A run
with several KV cache groups draws one lane per group (a block id holds one group's layers at a
time) and a last lane of the free blocks no group has.

The grid fits its column at any width: it is as wide as the column (positions are quantitative
cell coordinates, not fixed pixel steps) with at most MAX_COLUMNS cells a row. Past MAX_CELLS
blocks a cell stands for a range of blocks and is split into the shares of them in use, cached
free and free; `zoom` narrows the grid to a range of block ids, down to one cell per block.
Arrays throughout (numpy), so a 500,000-block pool costs tens of milliseconds per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from engine.config import RunConfig
from engine.trace import BlockState
from ui.block_cells import CHANGE_PRIORITY, block_details, change_codes
from ui.charts import STATE_COLOURS
from ui.holders import Holders

MAX_COLUMNS = 64
MAX_CELLS = 2048  # cells drawn at most: beyond, a cell stands for a range of blocks
CELL_HEIGHT_PX = (8, 22)  # a row's height: the column's width is unknown here, so assumed
ASSUMED_WIDTH_PX = 560
STATES = list(STATE_COLOURS)  # "in use", "free, cached", "free": the state codes 0, 1, 2
_GAP = 0.08  # the white gap around a cell, in cells


def grid_columns(num_cells: int) -> int:
    """A roughly 2:1 grid, between 8 and MAX_COLUMNS cells wide."""
    return max(8, min(MAX_COLUMNS, 2 ** math.ceil(math.log2(max(1, math.sqrt(num_cells * 2))))))


@dataclass(frozen=True)
class GridLayout:
    """How a grid is drawn: blocks per cell, its columns and rows, the block ids in view."""

    blocks_per_cell: int
    columns: int
    rows: int
    lo: int  # first and last block id in view (the zoom)
    hi: int
    lanes: int  # lane header rows (0 with one KV cache group)

    @property
    def aggregated(self) -> bool:
        return self.blocks_per_cell > 1

    @property
    def height_px(self) -> int:
        low, high = CELL_HEIGHT_PX
        return int(self.rows * max(low, min(high, ASSUMED_WIDTH_PX // self.columns)))


def plan(num_blocks: int, num_lanes: int = 0, zoom: tuple[int, int] | None = None) -> GridLayout:
    """The layout for `num_blocks` blocks (ids lo..hi when zoomed) in `num_lanes` lanes. Fixed
    for a run and a zoom, whatever the step, so the browser keeps the chart between steps."""
    lo, hi = zoom if zoom is not None else (0, num_blocks - 1)
    lo, hi = max(0, lo), min(num_blocks - 1, hi)
    n = max(0, hi - lo + 1)
    per_cell = max(1, math.ceil(n / MAX_CELLS))
    cells = math.ceil(n / per_cell)
    cols = grid_columns(cells)
    # every lane may end in a part-filled row: one more row per lane at most
    rows = math.ceil(cells / cols) + (2 * num_lanes if num_lanes else 0)
    return GridLayout(per_cell, cols, max(1, rows), lo, hi, num_lanes)


def group_labels(config: RunConfig) -> dict[int, str]:
    """Lane titles of a run's KV cache groups: their layers, and KV heads when split by head."""
    groups = config.kv_groups()
    split_heads = len({g.kv_heads for g in groups}) > 1
    return {g.group_id: f"layers {_span(g.layers)}"
            + (f", KV heads {_span(g.kv_heads)}" if split_heads else "") for g in groups}


def _span(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


# The frame ------------------------------------------------------------------------------------
def block_frame(state: BlockState, layout: GridLayout | None = None, *,
                group_labels: dict[int, str] | None = None, holders: Holders | None = None,
                step_events: pd.DataFrame | None = None, highlight: int | None = None,
                token_text: Callable[[int, int], str | None] | None = None,
                block_size: int = 16) -> pd.DataFrame:
    """One row per drawn piece: a block's cell, or an aggregated cell's share of a state.

    Columns: x, y (the cell), xa/xb/ya/yb (the piece), xm/ym (the cell's middle), state,
    block_id (the first in the cell; -1 on lane header rows), last_block, blocks, in_use,
    cached, free, changed (changed blocks in the cell), change (the step's change, a block),
    hl (1 where the highlighted request holds it), first (1 on a cell's first piece), label
    (the ref count of a shared block), lane (header text) and, one block a cell, the
    block_cells.block_details columns (holders, hash, parent, tokens, text, ...)."""
    lanes = _lanes(state, group_labels)
    layout = layout or plan(len(state.ref_counts), len(lanes) if len(lanes) > 1 else 0)
    arrays = _block_arrays(state, step_events, holders, highlight)
    cells = _cells(lanes, layout, arrays)
    if cells.empty or layout.aggregated:
        return cells
    details = block_details(state, cells["block_id"].to_numpy(), holders=holders,
                            step_events=step_events, token_text=token_text,
                            block_size=block_size)
    return pd.concat([cells.reset_index(drop=True), details], axis=1)


def _lanes(state: BlockState, labels: dict[int, str] | None) -> list[tuple[str, np.ndarray]]:
    """(title, block ids in order) per lane; one untitled lane with one group."""
    n = len(state.ref_counts)
    groups = sorted((set(state.groups) - {None}) | set(labels or ()))
    if len(groups) <= 1:
        return [("", np.arange(n))]
    codes = np.fromiter((-1 if g is None else g for g in state.groups), dtype=np.int64, count=n)
    out = []
    for g in [*groups, None]:
        ids = np.flatnonzero(codes == (-1 if g is None else g))
        name = "free, no group" if g is None else (
            f"group {g}" + (f" · {labels[g]}" if labels and g in labels else ""))
        out.append((f"{name} · {len(ids):,} blocks", ids))
    return out


def _block_arrays(state: BlockState, step_events: pd.DataFrame | None,
                  holders: Holders | None, highlight: int | None) -> dict[str, np.ndarray]:
    n = len(state.ref_counts)
    ref = np.asarray(state.ref_counts, dtype=np.int64)
    hashed = np.fromiter((h is not None for h in state.block_hashes), dtype=bool, count=n)
    code = np.where(ref > 0, 0, np.where(hashed, 1, 2))
    change = change_codes(n, step_events)
    hl = np.zeros(n, dtype=bool)
    if holders is not None and highlight is not None:
        held = [b for t in holders.tables_of(highlight).values() for b in t if 0 <= b < n]
        hl[held] = True
    return {"ref": ref, "code": code, "change": change, "hl": hl}


def _cells(lanes: list[tuple[str, np.ndarray]], layout: GridLayout,
           a: dict[str, np.ndarray]) -> pd.DataFrame:
    k, cols = layout.blocks_per_cell, layout.columns
    parts: list[dict[str, np.ndarray]] = []
    y = 0
    for title, ids in lanes:
        ids = ids[(ids >= layout.lo) & (ids <= layout.hi)]
        if title:
            parts.append(_header(title, y))
            y += 1
        if len(ids) == 0:
            continue
        cell = np.arange(len(ids)) // k
        num_cells = int(cell[-1]) + 1
        part = _aggregate(ids, cell, num_cells, a)
        part["x"] = np.arange(num_cells) % cols
        part["y"] = y + np.arange(num_cells) // cols
        parts.append(part)
        y += -(-num_cells // cols)
    if not parts:
        return pd.DataFrame(columns=_COLUMNS)
    return _pieces({c: np.concatenate([p[c] for p in parts]) for c in parts[0]})


def _aggregate(ids: np.ndarray, cell: np.ndarray, num_cells: int,
               a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(cell, weights=mask, minlength=num_cells).astype(np.int64)

    code = a["code"][ids]
    first = np.searchsorted(cell, np.arange(num_cells))
    last = np.r_[first[1:], len(ids)] - 1
    return {
        "block_id": ids[first], "last_block": ids[last],
        "blocks": np.bincount(cell, minlength=num_cells).astype(np.int64),
        "in_use": count(code == 0), "cached": count(code == 1), "free": count(code == 2),
        "changed": count(a["change"][ids] >= 0),
        "change": _CHANGE_NAMES[np.maximum.reduceat(a["change"][ids], first) + 1],
        "hl": (count(a["hl"][ids]) > 0).astype(np.int64),
        "ref_count": a["ref"][ids[first]], "lane": np.full(num_cells, "", dtype=object),
    }


def _header(title: str, y: int) -> dict[str, np.ndarray]:
    zero = np.zeros(1, dtype=np.int64)
    return {"block_id": zero - 1, "last_block": zero - 1, "blocks": zero, "in_use": zero,
            "cached": zero, "free": zero, "changed": zero, "change": np.array([""], dtype=object),
            "hl": zero, "ref_count": zero, "lane": np.array([title], dtype=object),
            "x": zero, "y": zero + y}


_COLUMNS = ["x", "y", "xa", "xb", "ya", "yb", "xm", "ym", "state", "block_id", "last_block",
            "blocks", "in_use", "cached", "free", "changed", "change", "hl", "first", "ref_count",
            "label", "lane"]
_CHANGE_NAMES = np.array(["", *CHANGE_PRIORITY], dtype=object)  # change code + 1 -> name
_STATE_NAMES = np.array(["", *STATES], dtype=object)  # piece state code + 1 -> name


def _pieces(cells: dict[str, np.ndarray]) -> pd.DataFrame:
    """A piece per (cell, state present in it), stacked top to bottom in STATES order; lane
    headers are one piece without a state. Arrays only: this runs at every step."""
    header = cells["block_id"] < 0
    counts = np.stack([cells["in_use"], cells["cached"], cells["free"]], axis=1)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    start = np.cumsum(shares, axis=1) - shares
    cell_of, code_of, ya, yb = [np.flatnonzero(header)], [np.full(header.sum(), -1)], [], []
    ya.append(cells["y"][header] + 0.5)
    yb.append(cells["y"][header] + 0.5)
    inner = 1 - 2 * _GAP
    for code in range(len(STATES)):
        present = np.flatnonzero((shares[:, code] > 0) & ~header)
        cell_of.append(present)
        code_of.append(np.full(len(present), code))
        top = cells["y"][present] + _GAP + start[present, code] * inner
        ya.append(top)
        yb.append(top + shares[present, code] * inner)
    index, code = np.concatenate(cell_of), np.concatenate(code_of)
    order = np.lexsort((code, index))
    index, code = index[order], code[order]
    out = {c: cells[c][index] for c in cells}
    out["ya"], out["yb"] = np.concatenate(ya)[order], np.concatenate(yb)[order]
    out["state"] = _STATE_NAMES[code + 1]
    out["first"] = ((np.r_[True, index[1:] != index[:-1]]) & (code >= 0)).astype(np.int64)
    out["xa"], out["xb"] = out["x"] + _GAP, out["x"] + 1 - _GAP
    out["xm"], out["ym"] = out["x"] + 0.5, out["y"] + 0.5
    single = (out["blocks"] == 1) & (out["ref_count"] > 1)
    out["label"] = np.where(single, out["ref_count"].astype(str), "")
    return pd.DataFrame({c: out[c] for c in _COLUMNS})
