"""Group managers for the retention policies (retention.py): which blocks each gives back.

All decide at block granularity after each step (`retain`), never touch a request's last block
(it holds the token being generated, and in a quantized cache it is still in the residual),
and give blocks back through `remove_blocks`, so the pool sees ordinary frees (a hashed block
stays cached, findable by prefix hits, as in vLLM's `SlidingWindowManager`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.group_manager import FullAttentionManager, PrefixChain
from engine.kv_cache.retention import parse_retention
from engine.kv_cache.spec import KVCacheGroup


def make_manager(pool: BlockPool, group: KVCacheGroup) -> FullAttentionManager:
    """The manager for the group's policy."""
    retention = parse_retention(group.policy)
    cls = {"full": FullAttentionManager, "window": WindowManager, "h2o": H2OManager,
           "snapkv": SnapKVManager}[retention.name]
    return cls(pool, group, retention)


def _live(table: list[int], null: int) -> list[int]:
    return [i for i, b in enumerate(table) if b != null]


class WindowManager(FullAttentionManager):
    """StreamingLLM: keeps the blocks holding the first `sink` and the last `recent` tokens, so
    a sequence holds at most ceil((sink + recent) / block_size) + 1 blocks however long it
    runs. A prefix hit needs only the blocks the window needs at the hit's end."""

    def _needed(self, num_tokens: int) -> set[int]:
        bs, r = self.block_size, self.retention
        sink = set(range(-(-min(r.sink, num_tokens) // bs)))
        recent = set(range(max(0, num_tokens - r.recent) // bs, -(-num_tokens // bs)))
        return sink | recent

    def retain(self, request_id: int, num_computed_tokens: int, num_prompt_tokens: int
               ) -> list[int]:
        table = self._tables.get(request_id, [])
        full = min(num_computed_tokens // self.block_size, len(table))
        needed = self._needed(num_computed_tokens)
        return [i for i in _live(table[:full], self.pool.null_block)
                if i not in needed and i < len(table) - 1]

    def find_prefix(self, chain: PrefixChain, max_blocks: int) -> list[int]:
        for k in range(max_blocks, 0, -1):
            hits = self.hits_at(chain, k)
            if hits is not None:
                return hits
        return []

    def hits_at(self, chain: PrefixChain, num_blocks: int) -> list[int] | None:
        hits = [self.pool.null_block] * num_blocks
        for i in sorted(self._needed(num_blocks * self.block_size)):
            block = self._cached(chain, i)
            if block is None:
                return None
            hits[i] = block
        return hits


class _ScoredManager(FullAttentionManager):
    """Keeps each request's attention mass per table block (summed over the group's layers and
    query heads, over the steps it was measured in)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mass: dict[int, np.ndarray] = {}

    def add_attention(self, request_id: int, mass: Sequence[float]) -> None:
        values = np.asarray(mass, dtype=np.float64)
        have = self.mass.get(request_id, np.zeros(0))
        if len(have) < len(values):
            have = np.concatenate([have, np.zeros(len(values) - len(have))])
        have[:len(values)] += values
        self.mass[request_id] = have

    def score(self, request_id: int, index: int) -> float:
        mass = self.mass.get(request_id)
        return float(mass[index]) if mass is not None and index < len(mass) else 0.0

    def free(self, request_id: int) -> None:
        super().free(request_id)
        self.mass.pop(request_id, None)

    def find_prefix(self, chain: PrefixChain, max_blocks: int) -> list[int]:
        return []  # the kept blocks depend on this request's own attention

    def hits_at(self, chain: PrefixChain, num_blocks: int) -> list[int] | None:
        return [] if num_blocks == 0 else None


class H2OManager(_ScoredManager):
    """Heavy hitters by block: once the group holds more than `heavy + recent` tokens' worth
    of blocks, the older block (not among the last `recent` tokens') with the least
    accumulated attention goes, until it fits."""

    def retain(self, request_id: int, num_computed_tokens: int, num_prompt_tokens: int
               ) -> list[int]:
        table = self._tables.get(request_id, [])
        bs, r = self.block_size, self.retention
        limit = -(-(r.heavy + r.recent) // bs)
        recent_from = max(0, num_computed_tokens - r.recent) // bs
        live = _live(table, self.pool.null_block)
        candidates = sorted((i for i in live if i < recent_from and i < len(table) - 1),
                            key=lambda i: (self.score(request_id, i), i))
        excess = len(live) - limit
        return sorted(candidates[:max(0, excess)])


class SnapKVManager(_ScoredManager):
    """SnapKV: once the prompt is in the cache, keep the blocks of its last `window` tokens and
    the top prompt blocks by the window's votes within `budget` tokens; drop the others once.
    Blocks added while decoding are kept."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.selected: set[int] = set()  # requests whose prompt has been pruned

    def retain(self, request_id: int, num_computed_tokens: int, num_prompt_tokens: int
               ) -> list[int]:
        if request_id in self.selected or num_computed_tokens < num_prompt_tokens:
            return []
        self.selected.add(request_id)
        table, bs, r = self._tables.get(request_id, []), self.block_size, self.retention
        window_from = max(0, num_prompt_tokens - r.window) // bs
        prompt_blocks = -(-num_prompt_tokens // bs)
        candidates = [i for i in _live(table[:prompt_blocks], self.pool.null_block)
                      if i < window_from and i < len(table) - 1]
        keep = max(0, r.budget // bs)
        ranked = sorted(candidates, key=lambda i: (-self.score(request_id, i), i))
        return sorted(ranked[keep:])

    def free(self, request_id: int) -> None:
        super().free(request_id)
        self.selected.discard(request_id)  # a preempted request selects again when recomputed
