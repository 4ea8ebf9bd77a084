"""Paged KV-cache memory with prefix caching (vLLM v1 semantics).

A full block is identified by a chained hash of its tokens and its parent block's hash, so equal
prefixes map to equal blocks. Freed blocks keep their hash ("cached free") and sit in an LRU free
queue; a prefix hit revives them, and a hash is dropped only when its block is popped for reuse.
Every state change is recorded as a `BlockEvent` that `engine.trace.apply_block_event` replays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.free_block_queue import FreeBlockQueue, KVBlock
from engine.trace import BlockEvent, BlockEventKind, Keyframe

# Parent of a request's first block. An int, not None: hash(None) is address-based before
# Python 3.12, and hashes must be identical across processes to compare stored runs.
ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Chained block hash; Python's hash of an int tuple is deterministic across processes."""
    return hash((parent_hash, token_ids))


def hash_hex(block_hash: int) -> str:
    """Trace form of a hash: 64-bit two's complement, fixed width."""
    return f"{block_hash & (2**64 - 1):016x}"


@dataclass(slots=True)
class _RequestBlocks:
    """One request's memory. `block_table` is the very list the scheduler keeps a reference to."""

    block_table: list[int] = field(default_factory=list)
    # Chained hashes of the table's leading full blocks, parents of the next block to cache.
    block_hashes: list[int] = field(default_factory=list)


class BlockManager:
    """Owns every KV block: ref counts, the prefix-cache hash map and the free queue.

    Invariants (asserted by `check_invariants`):
      - `block.ref_count` equals the number of block tables holding the block, and is 0 iff the
        block is in the free queue; a table never holds a block twice.
      - `_cached[h] is block` iff `block.block_hash == h`; at most one block holds a hash.
      - `_num_cached_free` counts free blocks that are still hashed.
    Only this class mutates blocks' ref counts, hashes and owners; the scheduler reads block
    tables and sets `step`, nothing else.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.step = 0  # set by the engine before each step; stamped on every event
        self._blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self._blocks)  # block 0 at the head
        self._cached: dict[int, KVBlock] = {}
        self._requests: dict[int, _RequestBlocks] = {}
        self._num_cached_free = 0
        self._events: list[BlockEvent] = []

    # ---- counters (O(1)) ----

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_free_blocks(self) -> int:
        return self._num_cached_free

    def block_table(self, request_id: int) -> list[int]:
        """The request's live block table (created empty on first use, cleared by `free`)."""
        return self._request(request_id).block_table

    # ---- prefix cache ----

    def lookup_prefix(self, token_ids: Sequence[int], max_blocks: int | None = None) -> list[int]:
        """Ids of cached blocks matching the leading full blocks of `token_ids`. Changes nothing."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        n = len(token_ids) // bs
        if max_blocks is not None:
            n = min(n, max_blocks)
        hits: list[int] = []
        parent = ROOT_HASH
        for i in range(n):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash_block(parent, tokens)
            block = self._cached.get(h)
            # Equal hashes are not proof: compare what the hash was made of.
            if block is None or block.token_ids != tokens or block.parent_hash != parent:
                break
            hits.append(block.block_id)
            parent = h
        return hits

    def cache_blocks(
        self, request_id: int, token_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Hash and register the request's blocks that became full within `num_computed_tokens`."""
        if not self.enable_prefix_caching:
            return
        req = self._requests[request_id]
        bs = self.block_size
        num_full = min(num_computed_tokens // bs, len(req.block_table))
        for i in range(len(req.block_hashes), num_full):
            parent = req.block_hashes[-1] if req.block_hashes else ROOT_HASH
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash_block(parent, tokens)
            req.block_hashes.append(h)
            block = self._blocks[req.block_table[i]]
            if block.block_hash is not None:
                assert block.block_hash == h, f"block {block.block_id} rehashed differently"
                continue  # a prefix hit: already registered under this very hash
            if h in self._cached:
                # Computed concurrently by another request: keep the first, leave this unhashed.
                continue
            block.block_hash, block.parent_hash, block.token_ids = h, parent, tokens
            self._cached[h] = block
            self._emit(block, "cache", request_id, hash_hex(h))

    # ---- allocation ----

    def num_blocks_needed(
        self, request_id: int, num_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> int:
        """Free-queue blocks that `allocate` would consume (revived cached free blocks count)."""
        table = self._requests[request_id].block_table if request_id in self._requests else ()
        if cached_blocks and table:
            raise ValueError(f"request {request_id} already has blocks; prefix hits come first")
        revived = sum(1 for b in cached_blocks if self._blocks[b].ref_count == 0)
        covered = len(table) + len(cached_blocks)
        return revived + max(0, -(-num_tokens // self.block_size) - covered)

    def can_allocate(
        self, request_id: int, num_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> bool:
        return self.num_blocks_needed(request_id, num_tokens, cached_blocks) <= len(self._free)

    def allocate(self, request_id: int, num_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Grow the request's table to cover `num_tokens`; False (and no change) if out of blocks.

        `cached_blocks` (from `lookup_prefix`, on the request's first allocation only) are
        touched first; then new blocks are popped from the free-queue head.
        """
        self._check_prefix_chain(cached_blocks)
        if not self.can_allocate(request_id, num_tokens, cached_blocks):
            return False
        req = self._request(request_id)
        for block_id in cached_blocks:
            block = self._blocks[block_id]
            assert block.block_hash is not None
            if block.ref_count == 0:
                self._free.remove(block)
                self._num_cached_free -= 1
            block.ref_count += 1
            block.owner = request_id
            req.block_table.append(block_id)
            req.block_hashes.append(block.block_hash)
            self._emit(block, "touch", request_id, hash_hex(block.block_hash))
        for _ in range(-(-num_tokens // self.block_size) - len(req.block_table)):
            block = self._free.popleft()
            if block.block_hash is not None:
                # Lazy eviction: the hash survives until the block is actually reused.
                self._emit(block, "evict", request_id, hash_hex(block.block_hash))
                del self._cached[block.block_hash]
                block.reset_hash()
                self._num_cached_free -= 1
            block.ref_count = 1
            block.owner = request_id
            req.block_table.append(block.block_id)
            self._emit(block, "allocate", request_id)
        return True

    def free(self, request_id: int) -> None:
        """Release the request's blocks, chain tail first so prefixes outlive their suffixes."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for block_id in reversed(req.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                block.owner = None
                self._free.append(block)
                if block.block_hash is not None:
                    self._num_cached_free += 1
            self._emit(block, "free", request_id)
        # The scheduler may still hold this list; emptying it keeps stale ids out of its hands.
        req.block_table.clear()

    # ---- trace ----

    def drain_events(self) -> list[BlockEvent]:
        events, self._events = self._events, []
        return events

    def snapshot(self, step: int) -> Keyframe:
        blocks = self._blocks
        return Keyframe(
            step=step,
            ref_counts=[b.ref_count for b in blocks],
            block_hashes=[None if b.block_hash is None else hash_hex(b.block_hash) for b in blocks],
            owners=[b.owner for b in blocks],
            free_queue=self._free.block_ids(),
        )

    def check_invariants(self) -> None:
        """Assert every invariant in the class docstring (O(num_blocks); for tests)."""
        queued = self._free.check_links(self.num_blocks)
        assert len(set(queued)) == len(queued), f"free queue repeats a block: {queued}"
        holders = [0] * self.num_blocks
        for rid, req in self._requests.items():
            table = req.block_table
            assert len(set(table)) == len(table), f"request {rid} holds a block twice: {table}"
            assert len(req.block_hashes) <= len(table), f"request {rid}: more hashes than blocks"
            for block_id in table:
                holders[block_id] += 1
        cached_free = 0
        for block in self._blocks:
            b, ref = block.block_id, block.ref_count
            assert ref >= 0, f"block {b}: negative ref_count {ref}"
            assert (ref == 0) == block.in_free_queue, f"block {b}: ref {ref}, queued mismatch"
            assert ref == holders[b], f"block {b}: ref {ref} but {holders[b]} tables hold it"
            assert (ref == 0) == (block.owner is None), f"block {b}: ref {ref}, owner {block.owner}"
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, f"block {b}: hash not in map"
                cached_free += ref == 0
        for h, block in self._cached.items():
            assert block.block_hash == h, f"hash map entry {h} points at block {block.block_id}"
        assert sum(holders) == sum(b.ref_count for b in self._blocks), "reference sums differ"
        assert cached_free == self._num_cached_free, (
            f"cached-free counter {self._num_cached_free}, actual {cached_free}"
        )

    # ---- helpers ----

    def _request(self, request_id: int) -> _RequestBlocks:
        req = self._requests.get(request_id)
        if req is None:
            req = self._requests[request_id] = _RequestBlocks()
        return req

    def _check_prefix_chain(self, cached_blocks: Sequence[int]) -> None:
        # A hit list goes stale if another allocation evicted one of its blocks in between.
        parent = ROOT_HASH
        for block_id in cached_blocks:
            block = self._blocks[block_id]
            if block.block_hash is None or block.parent_hash != parent:
                raise ValueError(f"cached_blocks {list(cached_blocks)} is not a live cached prefix")
            parent = block.block_hash

    def _emit(
        self,
        block: KVBlock,
        kind: BlockEventKind,
        request_id: int | None,
        block_hash: str | None = None,
    ) -> None:
        self._events.append(
            BlockEvent(self.step, block.block_id, kind, request_id, block.ref_count, block_hash)
        )
