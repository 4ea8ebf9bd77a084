"""Every request holding each KV block, and each request's block tables, rebuilt from the trace.

The trace's block state keeps one owner per block (the last request that allocated or touched
it). Replay shows more: all holders of a shared block and the block's place in each holder's
block table (its token range), the prefix chain made visible. Both follow from the block events
replayed in order, per (request, group):

- allocate by r: the block joins the end of r's table (new blocks always extend a table);
- touch by r (a prefix hit): the block takes its place in the chain. A hash's depth (its table
  index) is learnt from the "cache" event that registered it, so a window group's hit, which
  leaves the blocks outside the window as null slots (no event), still puts each block at its
  index;
- cache by r: the slot gets its hash; the hash's depth and its parent's hash are recorded;
- free / free_head / drop by r: the block leaves r's table (its slot becomes null, so later
  slots keep their indexes); a table with no block left is gone (finished or preempted).

`HolderIndex` keeps checkpoints (the holders after some steps) so that any step replays only
the events since the nearest one. No engine, store or Streamlit here: the caller fetches events.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

NULL = -1  # a table slot without a block: given back by a retention policy, or never needed
ROOT = "root"  # the parent of a chain's first block
MIN_CHECKPOINT_EVENTS = 4096  # events replayed between two checkpoints, at least

TableKey = tuple[int, int]  # (request id, group id)


class Event(NamedTuple):
    """The fields of an engine.trace.BlockEvent that holders need, in that order."""

    step: int
    block_id: int
    kind: str
    request_id: int | None
    block_hash: str | None
    group_id: int


class Holding(NamedTuple):
    request_id: int
    group_id: int
    index: int  # the block's slot in the request's table: tokens [index*bs, (index+1)*bs)


@dataclass
class Holders:
    """Block tables after some step. `depth` and `parent` only ever gain entries (a hash's
    depth and parent never change), so copies share them."""

    blocks: dict[TableKey, list[int]] = field(default_factory=dict)  # slot -> block id or NULL
    hashes: dict[TableKey, list[str | None]] = field(default_factory=dict)  # slot -> hash
    depth: dict[str, int] = field(default_factory=dict)  # hash -> its index in any chain
    parent: dict[str, str | None] = field(default_factory=dict)  # hash -> parent's (ROOT)

    def copy(self) -> Holders:
        return Holders({k: list(v) for k, v in self.blocks.items()},
                       {k: list(v) for k, v in self.hashes.items()}, self.depth, self.parent)

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.blocks.values())

    # Replay ------------------------------------------------------------------------------------
    def apply(self, e: Event) -> None:
        if e.request_id is None or e.kind == "evict":  # an evict names who reuses the block
            return
        key = (e.request_id, e.group_id)
        if e.kind == "allocate":
            self._put(key, len(self.blocks.get(key, ())), e.block_id, None)
        elif e.kind == "touch":
            n = len(self.blocks.get(key, ()))
            index = self.depth.get(e.block_hash, n) if e.block_hash else n
            if index < n and self.blocks[key][index] != NULL:
                index = n  # a depth that does not fit this table (a hash collision): append
            self._put(key, index, e.block_id, e.block_hash)
        elif e.kind == "cache":
            self._cache(key, e.block_id, e.block_hash)
        elif e.kind in ("free", "free_head", "drop"):
            self._release(key, e.block_id)

    def _put(self, key: TableKey, index: int, block: int, block_hash: str | None) -> None:
        blocks = self.blocks.setdefault(key, [])
        hashes = self.hashes.setdefault(key, [])
        while len(blocks) <= index:
            blocks.append(NULL)
            hashes.append(None)
        blocks[index], hashes[index] = block, block_hash

    def _cache(self, key: TableKey, block: int, block_hash: str | None) -> None:
        index = _find(self.blocks.get(key, ()), block)
        if index is None or block_hash is None:
            return
        hashes = self.hashes[key]
        hashes[index] = block_hash
        self.depth.setdefault(block_hash, index)
        self.parent.setdefault(block_hash, ROOT if index == 0 else hashes[index - 1])

    def _release(self, key: TableKey, block: int) -> None:
        blocks = self.blocks.get(key)
        index = _find(blocks or (), block)
        if blocks is None or index is None:
            return
        blocks[index] = NULL
        if all(b == NULL for b in blocks):
            del self.blocks[key], self.hashes[key]

    # Queries -----------------------------------------------------------------------------------
    def by_block(self) -> dict[int, list[Holding]]:
        """Block id -> its holdings, by request then group."""
        out: dict[int, list[Holding]] = {}
        for (request, group), blocks in sorted(self.blocks.items()):
            for index, b in enumerate(blocks):
                if b != NULL:
                    out.setdefault(b, []).append(Holding(request, group, index))
        return out

    def holders_of(self, block: int) -> list[Holding]:
        return [Holding(r, g, i) for (r, g), blocks in sorted(self.blocks.items())
                for i, b in enumerate(blocks) if b == block]

    def tables_of(self, request: int) -> dict[int, list[int]]:
        """Group id -> the request's block table (NULL in null slots); empty if it holds none."""
        return {g: list(blocks) for (r, g), blocks in sorted(self.blocks.items()) if r == request}

    def slot_hash(self, request: int, group: int, index: int) -> str | None:
        hashes = self.hashes.get((request, group), ())
        return hashes[index] if 0 <= index < len(hashes) else None

    def requests(self) -> list[int]:
        return sorted({r for r, _ in self.blocks})


def _find(blocks: list[int] | tuple, block: int) -> int | None:
    """The slot holding `block`, searched from the end (a request frees its tail first)."""
    for i in range(len(blocks) - 1, -1, -1):
        if blocks[i] == block:
            return i
    return None


Fetch = Callable[[int, int], Iterable[Event]]  # (after step, up to step) -> events in order


class HolderIndex:
    """Holders at any step of one run, from checkpoints plus the events since.

    A checkpoint is a copy of the holders; one is taken once the events replayed since the last
    exceed both MIN_CHECKPOINT_EVENTS and the copy's size, so checkpoints never cost more memory
    than the events they save replaying. Events of committed steps never change, so neither do
    the checkpoints of a run that is still being written. Thread-safe (Streamlit sessions).
    """

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._checkpoints: dict[int, Holders] = {0: Holders()}

    def at(self, step: int) -> Holders:
        with self._lock:
            base = max(s for s in self._checkpoints if s <= step)
            holders = self._checkpoints[base].copy()
            if step == base:
                return holders
            replayed, current = 0, None
            for event in self._fetch(base, step):
                if event.step != current:
                    if current is not None and replayed >= max(MIN_CHECKPOINT_EVENTS,
                                                               holders.size):
                        self._checkpoints[current] = holders.copy()
                        replayed = 0
                    current = event.step
                holders.apply(event)
                replayed += 1
            return holders

    @property
    def checkpoints(self) -> list[int]:
        return sorted(self._checkpoints)
