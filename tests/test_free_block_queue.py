"""FreeBlockQueue: O(1) intrusive LRU list. Comments draw the queue head (next to evict) first."""

from __future__ import annotations

import pytest

from engine.kv_cache.free_block_queue import FreeBlockQueue, KVBlock


def make(n: int) -> tuple[list[KVBlock], FreeBlockQueue]:
    blocks = [KVBlock(i) for i in range(n)]
    return blocks, FreeBlockQueue(blocks)


def test_initial_order_and_len() -> None:
    blocks, q = make(4)
    # head -> b0 -> b1 -> b2 -> b3 -> tail
    assert q.block_ids() == [0, 1, 2, 3]
    assert len(q) == 4
    assert all(b.in_free_queue for b in blocks)
    assert q.check_links(4) == [0, 1, 2, 3]


def test_popleft_takes_head_and_unlinks() -> None:
    blocks, q = make(3)
    b = q.popleft()
    # head -> b1 -> b2 -> tail
    assert b is blocks[0]
    assert b.prev is None and b.next is None and not b.in_free_queue
    assert q.block_ids() == [1, 2]
    assert len(q) == 2


def test_append_goes_to_tail() -> None:
    blocks, q = make(3)
    b0 = q.popleft()
    q.append(b0)
    # head -> b1 -> b2 -> b0 -> tail
    assert q.block_ids() == [1, 2, 0]
    q.check_links(3)


def test_remove_from_middle_head_and_tail() -> None:
    blocks, q = make(5)
    q.remove(blocks[2])
    # head -> b0 -> b1 -> b3 -> b4 -> tail
    assert q.block_ids() == [0, 1, 3, 4]
    q.remove(blocks[0])
    q.remove(blocks[4])
    # head -> b1 -> b3 -> tail
    assert q.block_ids() == [1, 3]
    assert len(q) == 2
    q.check_links(5)


def test_empty_queue_round_trip() -> None:
    blocks, q = make(2)
    q.popleft()
    q.popleft()
    # head -> tail
    assert len(q) == 0 and q.block_ids() == []
    with pytest.raises(IndexError):
        q.popleft()
    q.append(blocks[1])
    # head -> b1 -> tail
    assert q.block_ids() == [1]
    q.check_links(2)


def test_double_append_and_remove_of_unlinked_rejected() -> None:
    blocks, q = make(2)
    with pytest.raises(ValueError):
        q.append(blocks[0])  # still linked
    b = q.popleft()
    with pytest.raises(ValueError):
        q.remove(b)  # already unlinked
    assert q.block_ids() == [1]


def test_check_links_detects_corruption() -> None:
    blocks, q = make(3)
    blocks[2].prev = blocks[0]  # skip b1 on the way back
    with pytest.raises(AssertionError):
        q.check_links(3)
