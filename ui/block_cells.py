"""What the grid tells about each block: its holders, chain position, tokens and the step's
changes (the tooltip columns of ui.block_grid and the inspector panel on Replay)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from engine.trace import BlockState
from ui.holders import ROOT, Holders, Holding

# A block event kind as the grid names it, and which of a block's changes in one step its dot
# shows (the last of this list that happened).
KIND_NAMES = {"allocate": "allocated", "touch": "prefix hit", "cache": "cached", "free": "freed",
              "free_head": "freed", "evict": "evicted", "drop": "dropped"}
CHANGE_PRIORITY = ["freed", "cached", "allocated", "prefix hit", "dropped", "evicted"]
MAX_HOLDERS_SHOWN = 12
DETAIL_COLUMNS = ["holders", "tokens", "text", "hash", "parent", "group", "change_text"]
NO_TOKENS = "tokens not recorded"


def changed_blocks(step_events: pd.DataFrame | None) -> Iterable[int]:
    if step_events is None or step_events.empty:
        return []
    return step_events["block_id"].astype(int).unique().tolist()


def change_kinds(step_events: pd.DataFrame | None) -> dict[int, list[str]]:
    """Block id -> its changes in the step, in order, e.g. ["evicted", "allocated"]."""
    out: dict[int, list[str]] = {}
    if step_events is None or step_events.empty:
        return out
    for b, kind, reason in zip(step_events["block_id"], step_events["kind"],
                               step_events.get("reason", [None] * len(step_events)),
                               strict=True):
        name = KIND_NAMES.get(kind, kind)
        if kind == "drop" and isinstance(reason, str) and reason:
            name = f"dropped ({reason})"
        names = out.setdefault(int(b), [])
        if name not in names:
            names.append(name)
    return out


def change_codes(num_blocks: int, step_events: pd.DataFrame | None) -> np.ndarray:
    """Per block, the index in CHANGE_PRIORITY of its most telling change (-1: none)."""
    codes = np.full(num_blocks, -1, dtype=np.int64)
    for b, names in change_kinds(step_events).items():
        if 0 <= b < num_blocks:
            codes[b] = max(CHANGE_PRIORITY.index(n.split(" (")[0]) for n in names)
    return codes


def block_details(state: BlockState, ids: np.ndarray, *, holders: Holders | None,
                  step_events: pd.DataFrame | None,
                  token_text: Callable[[int, int], str | None] | None,
                  block_size: int) -> pd.DataFrame:
    """DETAIL_COLUMNS for each block id in `ids` (-1: a lane header row, left blank)."""
    held = holders.by_block() if holders is not None else {}
    changes = change_kinds(step_events)
    rows = []
    for b in ids.tolist():
        if b < 0:
            rows.append(("",) * len(DETAIL_COLUMNS))
            continue
        info = describe(state, b, held.get(b, []), holders, token_text, block_size)
        rows.append((info["holders"], info["tokens"], info["text"], info["hash"],
                     info["parent"], info["group"], ", ".join(changes.get(b, []))))
    return pd.DataFrame(rows, columns=DETAIL_COLUMNS)


def describe(state: BlockState, b: int, holdings: list[Holding], holders: Holders | None,
             token_text: Callable[[int, int], str | None] | None,
             block_size: int) -> dict[str, str]:
    """One block in words: who holds it, which tokens, its hash and its parent's."""
    ref = state.ref_counts[b]
    block_hash = state.block_hashes[b]
    group = state.groups[b]
    out = {"holders": "", "tokens": "", "text": "", "hash": block_hash or "—", "parent": "",
           "group": "—" if group is None else str(group)}
    if holdings:
        names = [str(h.request_id) for h in holdings[:MAX_HOLDERS_SHOWN]]
        more = len(holdings) - len(names)
        out["holders"] = "request" + ("s " if len(holdings) > 1 else " ") + ", ".join(names) + (
            f" and {more} more" if more > 0 else "")
    elif ref > 0 and state.owners[b] is not None:
        out["holders"] = f"request {state.owners[b]} (last to take it)"
    if holdings:
        first = holdings[0]
        start = first.index * block_size
        out["tokens"] = f"{start}-{start + block_size - 1} (slot {first.index})"
        text = token_text(first.request_id, first.index) if token_text else None
        out["text"] = NO_TOKENS if text is None else text
        out["parent"] = _parent(holders, first, block_hash)
    elif block_hash is not None and holders is not None:
        out["parent"] = _format_parent(holders.parent.get(block_hash))
    return out


def _parent(holders: Holders | None, h: Holding, block_hash: str | None) -> str:
    if holders is None:
        return ""
    if block_hash is not None and block_hash in holders.parent:
        return _format_parent(holders.parent[block_hash])
    if h.index == 0:
        return _format_parent(ROOT)
    return _format_parent(holders.slot_hash(h.request_id, h.group_id, h.index - 1))


def _format_parent(parent: str | None) -> str:
    if parent == ROOT:
        return "none: the first block of the prompt"
    return parent or "—"
