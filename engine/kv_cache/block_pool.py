"""BlockPool: every KV block of every group, with prefix caching (vLLM 0.33.0's semantics).

A full block is identified by a chained hash of its tokens and its parent block's hash, so equal
prefixes map to equal blocks; the hash map is keyed by (hash, group), since a block id addresses
one group's layers. Freed blocks keep their hash ("cached free") and sit in an LRU free queue; a
prefix hit revives them, and a hash is dropped only when its block is popped for reuse. Every
state change is recorded as a `BlockEvent` that `engine.trace.apply_block_event` replays.

Two rules follow vLLM 0.33.0's `block_pool.py` where a simpler pool would differ (measured
against vLLM's own manager by bench/vllm_fidelity.py):
- `free_blocks` puts blocks that reach ref 0 *without* a hash at the head of the free queue
  (they can never serve a hit: reuse them first), and hashed ones at the tail, in the order
  given (a request's tail block first, so prefixes outlive suffixes);
- a block recomputed while an equal block is cached is cached too: one key may list several
  blocks, a lookup takes the earliest, and evicting one copy leaves the others findable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.kv_cache.free_block_queue import FreeBlockQueue, KVBlock
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


class BlockPool:
    """Owns ref counts, hashes, owners and groups of `num_blocks` blocks, the hash map, the free
    queue and the events. Which blocks a request needs is the group managers' business; they
    ask the pool for new blocks, touch cached ones, register full ones and free them.

    Invariants (asserted by `check_invariants` given the managers' block tables):
      - `block.ref_count` equals the number of block tables holding the block, and is 0 iff the
        block is in the free queue; a table never holds a block twice.
      - a block is listed in `_cached[(h, g)]` iff `(block.block_hash, block.group_id) == (h, g)`;
        no key lists an empty dict.
      - `block.group_id` is None iff the block is free and unhashed.
      - `_num_cached_free` counts free blocks that are still hashed.
    The null block (`null_block`, id `num_blocks`) is a storage page outside the pool that
    fills table slots whose block was given back mid-request; it is never allocated or freed.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"need num_blocks >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.null_block = num_blocks
        self.enable_caching = enable_caching
        self.step = 0  # stamped on every event; the scheduler sets it each step
        self._blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self._blocks)  # block 0 at the head
        # (hash, group) -> {block_id: block}, earliest cached first (dicts keep insertion order)
        self._cached: dict[tuple[int, int], dict[int, KVBlock]] = {}
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

    def block(self, block_id: int) -> KVBlock:
        return self._blocks[block_id]

    # ---- prefix cache ----

    def get_cached_block(self, block_hash: int, parent_hash: int, token_ids: tuple[int, ...],
                         group_id: int) -> KVBlock | None:
        """The earliest block cached under (hash, group) that really holds these tokens after
        this parent (equal hashes are not proof), or None. Changes nothing."""
        for block in self._cached.get((block_hash, group_id), {}).values():
            if block.token_ids == token_ids and block.parent_hash == parent_hash:
                return block
        return None

    def cache_block(self, block: KVBlock, block_hash: int, parent_hash: int,
                    token_ids: tuple[int, ...], request_id: int) -> None:
        """Register a full block under its hash (also when an equal block is cached already)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        assert block.group_id is not None and block.ref_count > 0
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent_hash, token_ids
        self._cached.setdefault((block_hash, block.group_id), {})[block.block_id] = block
        self._emit(block, "cache", request_id, hash_hex(block_hash))

    # ---- allocation ----

    def get_new_blocks(self, num_blocks: int, group_id: int, request_id: int) -> list[KVBlock]:
        """Pop `num_blocks` from the free-queue head (the caller checked there are enough)."""
        blocks = []
        for _ in range(num_blocks):
            block = self._free.popleft()
            if block.block_hash is not None:
                self._evict(block, request_id)
            block.ref_count, block.owner, block.group_id = 1, request_id, group_id
            self._emit(block, "allocate", request_id)
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVBlock], request_id: int) -> None:
        """One more reference to each (cached) block; a free one leaves the queue's middle."""
        for block in blocks:
            assert block.block_hash is not None
            if block.ref_count == 0:
                self._free.remove(block)
                self._num_cached_free -= 1
            block.ref_count += 1
            block.owner = request_id
            self._emit(block, "touch", request_id, hash_hex(block.block_hash))

    def free_blocks(self, ordered_blocks: Sequence[KVBlock], request_id: int,
                    reason: str | None = None) -> None:
        """Drop one reference of each block; `ordered_blocks` is in eviction order (first is
        evicted first). Blocks reaching 0 join the queue: unhashed ones at the head as a group
        in that order, hashed ones at the tail. With a `reason`, the events are `drop`s (a
        retention policy gave the blocks back mid-request), else `free`/`free_head`."""
        to_head: list[tuple[KVBlock, int]] = []
        tail_kind: BlockEventKind = "drop" if reason else "free"
        for block in ordered_blocks:
            block.ref_count -= 1
            if block.ref_count > 0:
                self._emit(block, tail_kind, request_id, reason=reason)
                continue
            block.owner = None
            if block.block_hash is None:
                to_head.append((block, block.group_id))
                block.group_id = None
            else:
                self._free.append(block)
                self._num_cached_free += 1
                self._emit(block, tail_kind, request_id, reason=reason)
        # Prepending in reverse keeps their order at the head; the events follow the same
        # order, so replaying them one by one (head insertion) rebuilds the queue.
        for block, group_id in reversed(to_head):
            self._free.prepend(block)
            self._emit(block, "drop" if reason else "free_head", request_id, group_id=group_id,
                       reason=reason)

    def _evict(self, block: KVBlock, request_id: int) -> None:
        """Lazy eviction: the hash goes only when its block is actually reused."""
        assert block.block_hash is not None and block.group_id is not None
        key = (block.block_hash, block.group_id)
        self._emit(block, "evict", request_id, hash_hex(block.block_hash))
        copies = self._cached[key]
        del copies[block.block_id]
        if not copies:
            del self._cached[key]
        block.reset_hash()
        block.group_id = None
        self._num_cached_free -= 1

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
            groups=[b.group_id for b in blocks],
        )

    def check_invariants(self, holders: list[int]) -> None:
        """Assert the class invariants; `holders[b]` counts the block tables holding block b."""
        queued = self._free.check_links(self.num_blocks)
        assert len(set(queued)) == len(queued), f"free queue repeats a block: {queued}"
        cached_free = 0
        for block in self._blocks:
            b, ref = block.block_id, block.ref_count
            assert ref >= 0, f"block {b}: negative ref_count {ref}"
            assert (ref == 0) == block.in_free_queue, f"block {b}: ref {ref}, queued mismatch"
            assert ref == holders[b], f"block {b}: ref {ref} but {holders[b]} tables hold it"
            assert (ref == 0) == (block.owner is None), f"block {b}: ref {ref}, owner {block.owner}"
            hashed = block.block_hash is not None
            assert (ref == 0 and not hashed) == (block.group_id is None), f"block {b}: group"
            if hashed:
                key = (block.block_hash, block.group_id)
                assert self._cached.get(key, {}).get(b) is block, f"block {b}: hash not in map"
                cached_free += ref == 0
        for (h, g), copies in self._cached.items():
            assert copies, f"hash map entry {h} of group {g} lists no block"
            for block in copies.values():
                assert (block.block_hash, block.group_id) == (h, g), f"map entry {h}, {g}"
        assert cached_free == self._num_cached_free, (
            f"cached-free counter {self._num_cached_free}, actual {cached_free}"
        )

    def _emit(self, block: KVBlock, kind: BlockEventKind, request_id: int | None,
              block_hash: str | None = None, group_id: int | None = None,
              reason: str | None = None) -> None:
        group = block.group_id if group_id is None else group_id
        assert group is not None, f"block {block.block_id}: {kind} event outside any group"
        self._events.append(BlockEvent(self.step, block.block_id, kind, request_id,
                                       block.ref_count, block_hash, group, reason))
