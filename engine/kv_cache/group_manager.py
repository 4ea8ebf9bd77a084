"""One group's view of the requests: which blocks each needs, in a block table per request.

`FullAttentionManager` keeps every block a request ever needed. Managers for the retention
policies (retention_managers.py) subclass it: after each step `retain` names the blocks to give
back and `remove_blocks` returns them to the pool; the table keeps its length with the null
block in the slot (attention masks it, never reads it), so positions still map to indexes.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.kv_cache.block_pool import ROOT_HASH, BlockPool, hash_block
from engine.kv_cache.retention import Retention
from engine.kv_cache.spec import KVCacheGroup


class PrefixChain:
    """Chained hashes of a token list's full blocks, computed on first use, shared by groups."""

    def __init__(self, token_ids: Sequence[int], block_size: int, hashes: list[int]) -> None:
        self.token_ids, self.block_size, self.hashes = token_ids, block_size, hashes

    def block_tokens(self, i: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(self.token_ids[i * bs:(i + 1) * bs])

    def parent(self, i: int) -> int:
        return self[i - 1] if i > 0 else ROOT_HASH

    def __getitem__(self, i: int) -> int:
        while len(self.hashes) <= i:
            n = len(self.hashes)
            self.hashes.append(hash_block(self.parent(n), self.block_tokens(n)))
        return self.hashes[i]


class FullAttentionManager:
    """Block tables of one group. Only this class edits its tables; the lists it returns are
    live (the runner reads them), so they are emptied, never replaced, when a request ends."""

    def __init__(self, pool: BlockPool, group: KVCacheGroup,
                 retention: Retention | None = None) -> None:
        self.retention = retention or Retention()
        self.pool = pool
        self.group = group
        self.group_id = group.group_id
        self.block_size = group.spec.block_size
        self._tables: dict[int, list[int]] = {}
        self._num_cached: dict[int, int] = {}  # leading table entries registered as cached

    def block_table(self, request_id: int) -> list[int]:
        """The request's live table (created empty on first use)."""
        table = self._tables.get(request_id)
        if table is None:
            table = self._tables[request_id] = []
            self._num_cached[request_id] = 0
        return table

    def tables(self) -> dict[int, list[int]]:
        return self._tables

    # ---- prefix hits ----

    def find_prefix(self, chain: PrefixChain, max_blocks: int) -> list[int]:
        """This group's cached blocks for the longest usable prefix of at most `max_blocks`
        of the chain's blocks (the null block where the group needs no block)."""
        hits = []
        for i in range(max_blocks):
            block = self._cached(chain, i)
            if block is None:
                break
            hits.append(block)
        return hits

    def hits_at(self, chain: PrefixChain, num_blocks: int) -> list[int] | None:
        """The blocks a hit of exactly `num_blocks` blocks would take, or None if one that it
        needs is not cached (full attention needs them all)."""
        hits = self.find_prefix(chain, num_blocks)
        return hits if len(hits) == num_blocks else None

    def _cached(self, chain: PrefixChain, i: int) -> int | None:
        block = self.pool.get_cached_block(chain[i], chain.parent(i), chain.block_tokens(i),
                                           self.group_id)
        return None if block is None else block.block_id

    # ---- allocation ----

    def num_blocks_needed(self, request_id: int, num_tokens: int,
                          cached_blocks: Sequence[int] = ()) -> int:
        """Free-queue blocks `allocate` would take (revived cached free blocks count)."""
        table = self._tables.get(request_id, ())
        if cached_blocks and table:
            raise ValueError(f"request {request_id} already has blocks; prefix hits come first")
        null = self.pool.null_block
        revived = sum(1 for b in cached_blocks if b != null and self.pool.block(b).ref_count == 0)
        covered = len(table) + len(cached_blocks)
        return revived + max(0, -(-num_tokens // self.block_size) - covered)

    def save_computed(self, request_id: int, cached_blocks: Sequence[int]) -> None:
        """Take a prefix hit: touch its blocks (reviving free ones) and start the table."""
        table = self.block_table(request_id)
        null = self.pool.null_block
        self.pool.touch([self.pool.block(b) for b in cached_blocks if b != null], request_id)
        table.extend(cached_blocks)
        self._num_cached[request_id] = len(table)

    def allocate_new(self, request_id: int, num_tokens: int) -> None:
        """Add new blocks until the table covers `num_tokens` (the caller checked that the pool
        has them: `num_blocks_needed`)."""
        table = self.block_table(request_id)
        missing = -(-num_tokens // self.block_size) - len(table)
        if missing > 0:
            new = self.pool.get_new_blocks(missing, self.group_id, request_id)
            table.extend(b.block_id for b in new)

    def cache_blocks(self, request_id: int, chain: PrefixChain, num_computed_tokens: int) -> None:
        """Register the table's blocks that became full within `num_computed_tokens` (not for
        a policy whose kept blocks no other request could use)."""
        if not self.retention.allows_prefix_hits:
            return
        table = self._tables[request_id]
        start = self._num_cached[request_id]
        end = min(num_computed_tokens // self.block_size, len(table))
        for i in range(start, end):
            if table[i] != self.pool.null_block:
                self.pool.cache_block(self.pool.block(table[i]), chain[i], chain.parent(i),
                                      chain.block_tokens(i), request_id)
        self._num_cached[request_id] = max(start, end)

    def free(self, request_id: int) -> None:
        """Give back all the request's blocks, its tail first, so prefixes outlive suffixes."""
        table = self._tables.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if table is None:
            return
        null = self.pool.null_block
        self.pool.free_blocks([self.pool.block(b) for b in reversed(table) if b != null],
                              request_id)
        table.clear()  # a scheduler still holding the list cannot read freed blocks

    def remove_blocks(self, request_id: int, indexes: Sequence[int],
                      reason: str | None = None) -> list[int]:
        """Give back the blocks at these table indexes mid-request (a retention policy's
        choice, `reason` says why); the null block takes their slots. Returns the block ids
        given back, in the order given."""
        table, null = self._tables[request_id], self.pool.null_block
        freed = [table[i] for i in indexes if table[i] != null]
        for i in indexes:
            table[i] = null
        self.pool.free_blocks([self.pool.block(b) for b in freed], request_id,
                              reason=reason or "given back")
        return freed

    # ---- retention (none here: full attention keeps everything) ----

    def retain(self, request_id: int, num_computed_tokens: int, num_prompt_tokens: int
               ) -> list[int]:
        """Table indexes of blocks the policy gives back now that `num_computed_tokens` of the
        request are in the cache (`num_prompt_tokens` of them its prompt)."""
        return []

    def add_attention(self, request_id: int, mass: Sequence[float]) -> None:
        """Attention mass per table block this step (only policies that score blocks use it)."""
