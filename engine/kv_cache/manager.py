"""KVCacheManager: one pool, one manager per group, one set of block tables per request.

The scheduler's only door to KV memory. A request's allocation is all-or-nothing across its
groups (a request needs its tokens in every layer), a prefix hit is the longest prefix every
group can serve (vLLM's hybrid coordinator: a window group needs only its window's blocks),
and after each step each group's retention policy may give blocks back (`retain`).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.kv_cache.block_pool import ROOT_HASH, BlockPool
from engine.kv_cache.group_manager import PrefixChain
from engine.kv_cache.retention_managers import make_manager
from engine.kv_cache.spec import KVCacheGroup
from engine.trace import BlockEvent, Keyframe

BlockTables = tuple[list[int], ...]  # one table per group, in group order


class KVCacheManager:
    """Only the scheduler calls the mutating methods (and stamps `step`); the model runner
    reads `block_tables`, the engine reads the counters and drains events."""

    def __init__(self, groups: tuple[KVCacheGroup, ...], num_blocks: int,
                 enable_prefix_caching: bool = True) -> None:
        if not groups:
            raise ValueError("a KV cache needs at least one group")
        self.groups = groups
        self.block_size = groups[0].spec.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.managers = [make_manager(self.pool, g) for g in groups]
        self._hashes: dict[int, list[int]] = {}  # a request's chained block hashes so far

    # ---- what the engine reads ----

    @property
    def step(self) -> int:
        return self.pool.step

    @step.setter
    def step(self, value: int) -> None:
        self.pool.step = value

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def null_block(self) -> int:
        return self.pool.null_block

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return self.pool.num_cached_free_blocks

    def block_tables(self, request_id: int) -> BlockTables:
        """The request's live tables (created empty on first use, emptied by `free`)."""
        return tuple(m.block_table(request_id) for m in self.managers)

    # ---- prefix cache ----

    def lookup_prefix(self, token_ids: Sequence[int], max_blocks: int | None = None
                      ) -> BlockTables:
        """Per group, the cached blocks of the longest prefix of `token_ids`' full blocks that
        every group holds (all lists equally long). Changes nothing."""
        n = len(token_ids) // self.block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        if not self.enable_prefix_caching or n == 0:
            return tuple([] for _ in self.managers)
        chain = PrefixChain(token_ids, self.block_size, [])
        for manager in self.managers:  # an upper bound: each group's own longest hit
            n = min(n, len(manager.find_prefix(chain, n)))
        while n > 0:  # the longest length every group can serve exactly
            hits = [m.hits_at(chain, n) for m in self.managers]
            if all(h is not None for h in hits):
                return tuple(hits)  # type: ignore[arg-type]
            n -= 1
        return tuple([] for _ in self.managers)

    def cache_blocks(self, request_id: int, token_ids: Sequence[int],
                     num_computed_tokens: int) -> None:
        """Hash and register the request's blocks that became full within
        `num_computed_tokens`, in every group."""
        if not self.enable_prefix_caching:
            return
        chain = PrefixChain(token_ids, self.block_size, self._hashes.setdefault(request_id, []))
        for manager in self.managers:
            manager.cache_blocks(request_id, chain, num_computed_tokens)

    # ---- allocation ----

    def num_blocks_needed(self, request_id: int, num_tokens: int,
                          cached_blocks: BlockTables | tuple[()] = ()) -> int:
        """Free-queue blocks that `allocate` would take, over all groups."""
        cached = cached_blocks or tuple(() for _ in self.managers)
        return sum(m.num_blocks_needed(request_id, num_tokens, c)
                   for m, c in zip(self.managers, cached, strict=True))

    def can_allocate(self, request_id: int, num_tokens: int,
                     cached_blocks: BlockTables | tuple[()] = ()) -> bool:
        needed = self.num_blocks_needed(request_id, num_tokens, cached_blocks)
        return needed <= self.pool.num_free_blocks

    def allocate(self, request_id: int, num_tokens: int,
                 cached_blocks: BlockTables | tuple[()] = ()) -> bool:
        """Grow the request's tables to cover `num_tokens` in every group; False (and no change)
        if the pool has too few free blocks. `cached_blocks` (from `lookup_prefix`, on the
        request's first allocation only) are touched before new blocks are popped."""
        self._check_prefix_chain(cached_blocks)
        if not self.can_allocate(request_id, num_tokens, cached_blocks):
            return False
        # Every group's hits are touched before any group pops new blocks: a pop may evict a
        # cached free block, and it must not be one another group is about to take.
        if cached_blocks:
            for manager, hits in zip(self.managers, cached_blocks, strict=True):
                manager.save_computed(request_id, hits)
        for manager in self.managers:
            manager.allocate_new(request_id, num_tokens)
        return True

    def free(self, request_id: int) -> None:
        """Release the request's blocks in every group (hashed ones stay cached)."""
        for manager in self.managers:
            manager.free(request_id)
        self._hashes.pop(request_id, None)

    def remove_blocks(self, request_id: int, group_id: int, indexes: Sequence[int],
                      reason: str | None = None) -> list[int]:
        """Give back one group's blocks at these table indexes mid-request (null in their
        slots). Returns the block ids given back."""
        return self.managers[group_id].remove_blocks(request_id, indexes, reason)

    # ---- retention ----

    def needs_attention(self, group_id: int) -> str | None:
        """'h2o' or 'snapkv' when the group's policy decides from attention scores."""
        retention = self.managers[group_id].retention
        return retention.name if retention.needs_attention else None

    def add_attention(self, group_id: int, request_id: int, mass: Sequence[float]) -> None:
        self.managers[group_id].add_attention(request_id, mass)

    def retain(self, request_id: int, num_computed_tokens: int, num_prompt_tokens: int) -> int:
        """Apply every group's retention policy to the request; returns the blocks given back."""
        dropped = 0
        for manager in self.managers:
            indexes = manager.retain(request_id, num_computed_tokens, num_prompt_tokens)
            if indexes:
                dropped += len(manager.remove_blocks(request_id, indexes,
                                                     manager.retention.reason))
        return dropped

    # ---- trace ----

    def drain_events(self) -> list[BlockEvent]:
        return self.pool.drain_events()

    def snapshot(self, step: int) -> Keyframe:
        return self.pool.snapshot(step)

    def check_invariants(self) -> None:
        """The pool's invariants against the tables of every group (O(num_blocks); tests)."""
        holders = [0] * self.pool.num_blocks
        for manager in self.managers:
            for rid, table in manager.tables().items():
                live = [b for b in table if b != self.pool.null_block]
                assert len(set(live)) == len(live), f"request {rid} holds a block twice: {table}"
                for block_id in live:
                    holders[block_id] += 1
                    group = self.pool.block(block_id).group_id
                    assert group == manager.group_id, f"block {block_id} of group {group} " \
                                                      f"in a table of group {manager.group_id}"
        self.pool.check_invariants(holders)

    def _check_prefix_chain(self, cached_blocks: BlockTables | tuple[()]) -> None:
        # A hit list goes stale if another allocation evicted one of its blocks in between.
        null = self.pool.null_block
        for hits in cached_blocks:
            parent: int | None = ROOT_HASH  # None: the previous entry was a null (not checked)
            for block_id in hits:
                if block_id == null:
                    parent = None
                    continue
                block = self.pool.block(block_id)
                if block.block_hash is None or parent not in (None, block.parent_hash):
                    raise ValueError(f"cached_blocks {cached_blocks} is not a live cached prefix")
                parent = block.block_hash
