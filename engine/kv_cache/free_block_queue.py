"""KV blocks and the O(1) LRU queue of free blocks (vLLM v1's FreeKVCacheBlockQueue).

The queue is an intrusive doubly linked list: the links live on the blocks themselves, so a
prefix hit can pull a cached free block out of the middle of the queue in O(1) instead of
scanning a list.
"""

from __future__ import annotations

from collections.abc import Iterator


class KVBlock:
    """One physical KV-cache block: one page of one group's layers.

    Invariants (kept by `BlockPool`, the only writer of every field except the links):
      - `ref_count` is the number of live block tables holding this block; `ref_count == 0` iff
        the block is in the free queue.
      - `block_hash` is not None iff the pool's hash map lists this block under
        (`block_hash`, `group_id`); then `token_ids` and `parent_hash` hold what the hash was
        computed from (the collision guard). A free block keeps its hash ("cached free") until
        it is popped for reuse (lazy eviction).
      - `group_id` is the group whose layers the block's page holds while it is in use or
        hashed; None while it is free and unhashed.
      - `owner` is the request that last allocated or touched the block, None while it is free.
      - `prev`/`next` are written only by `FreeBlockQueue`; both are None iff the block is not
        in a queue.
    """

    __slots__ = (
        "block_id", "ref_count", "block_hash", "parent_hash", "token_ids", "group_id", "owner",
        "prev", "next",
    )

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.parent_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.group_id: int | None = None
        self.owner: int | None = None
        self.prev: KVBlock | None = None
        self.next: KVBlock | None = None

    @property
    def in_free_queue(self) -> bool:
        return self.prev is not None

    def reset_hash(self) -> None:
        self.block_hash = None
        self.parent_hash = None
        self.token_ids = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count}, hash={self.block_hash})"


class FreeBlockQueue:
    """Free blocks in eviction order: the head is evicted (reused) next, freed blocks join the tail.

    Invariants: two sentinel nodes bracket the list, so insert and unlink never branch on
    emptiness; `len(self)` equals the number of blocks between them; every linked block has
    non-None `prev` and `next`, and unlinked blocks have both None. Only this class writes the
    links; callers decide *which* block moves (ref counts and hashes are the manager's business).
    """

    __slots__ = ("_head", "_tail", "_len")

    def __init__(self, blocks: list[KVBlock] | None = None) -> None:
        # Sentinels carry id -1 so a leak into a block table would be obvious.
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self._len = 0
        for block in blocks or ():
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next

    def popleft(self) -> KVBlock:
        """Unlink and return the head (the least recently freed block)."""
        if self._len == 0:
            raise IndexError("popleft from an empty FreeBlockQueue")
        block = self._head.next
        assert block is not None
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        """Link `block` at the tail (evicted last)."""
        last = self._tail.prev
        assert last is not None
        self._link(last, block)

    def prepend(self, block: KVBlock) -> None:
        """Link `block` at the head (reused next)."""
        self._link(self._head, block)

    def _link(self, after: KVBlock, block: KVBlock) -> None:
        if block.prev is not None or block.next is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        nxt = after.next
        assert nxt is not None
        after.next = block
        block.prev = after
        block.next = nxt
        nxt.prev = block
        self._len += 1

    def remove(self, block: KVBlock) -> None:
        """Unlink `block` from wherever it sits, in O(1)."""
        prev, nxt = block.prev, block.next
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next = nxt
        nxt.prev = prev
        block.prev = block.next = None
        self._len -= 1

    def block_ids(self) -> list[int]:
        return [block.block_id for block in self]

    def check_links(self, max_len: int) -> list[int]:
        """Walk the list, asserting the links agree both ways; return the ids head first.

        `max_len` bounds the walk so a corrupted cycle fails instead of hanging.
        """
        ids: list[int] = []
        node = self._head
        while node.next is not self._tail:
            nxt = node.next
            assert nxt is not None, f"free queue broken after block {node.block_id}"
            assert nxt.prev is node, f"free queue: block {nxt.block_id}.prev is not its predecessor"
            ids.append(nxt.block_id)
            assert len(ids) <= max_len, "free queue longer than the pool (cycle?)"
            node = nxt
        assert self._tail.prev is node, "free queue: tail sentinel's prev is stale"
        assert len(ids) == self._len, f"free queue walk found {len(ids)}, counter {self._len}"
        return ids
