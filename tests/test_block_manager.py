"""BlockManager: one test per vLLM v1 rule, then a random state machine checking every invariant
and that the emitted events replay (`engine.trace.apply_block_event`) to the same state.

Free queues are drawn head (next to evict) first; `*` marks a cached free block (still hashed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import engine.block_manager as bm_module
from engine.block_manager import ROOT_HASH, BlockManager, hash_block, hash_hex
from engine.trace import BlockState, apply_block_event


def fresh(num_blocks: int = 6, block_size: int = 2, caching: bool = True) -> BlockManager:
    bm = BlockManager(num_blocks, block_size, caching)
    bm.check_invariants()
    return bm


def kinds(bm: BlockManager) -> list[tuple[str, int, int | None, int]]:
    return [(e.kind, e.block_id, e.request_id, e.ref_count) for e in bm.drain_events()]


def run_prompt(bm: BlockManager, rid: int, tokens: list[int], hits: list[int] | None = None):
    """Admit a request (with prefix hits), compute all its tokens and cache its full blocks."""
    assert bm.allocate(rid, len(tokens), hits or [])
    bm.cache_blocks(rid, tokens, len(tokens))
    bm.check_invariants()


def test_initial_state() -> None:
    bm = fresh(4)
    # head -> b0 -> b1 -> b2 -> b3 -> tail
    snap = bm.snapshot(0)
    assert snap.free_queue == [0, 1, 2, 3]
    assert snap.ref_counts == [0] * 4 and snap.owners == [None] * 4
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_cached_free_blocks) == (4, 0, 0)


def test_allocate_pops_head_and_table_is_live() -> None:
    bm = fresh()
    table = bm.block_table(7)
    bm.step = 3
    assert bm.allocate(7, 3)  # 3 tokens, block size 2 -> 2 blocks
    # head -> b2 -> b3 -> b4 -> b5 -> tail
    assert table == [0, 1] and table is bm.block_table(7)
    assert bm.allocate(7, 5)  # grow by one block
    assert table == [0, 1, 2]
    events = bm.drain_events()
    assert [(e.kind, e.block_id, e.ref_count) for e in events] == [
        ("allocate", 0, 1), ("allocate", 1, 1), ("allocate", 2, 1)
    ]
    assert {e.step for e in events} == {3}
    bm.free(7)
    assert table == []  # a stale reference cannot read freed blocks
    bm.check_invariants()


def test_free_in_reverse_order() -> None:
    bm = fresh(5)
    assert bm.allocate(1, 6)
    # head -> b3 -> b4 -> tail
    bm.free(1)
    # head -> b3 -> b4 -> b2 -> b1 -> b0 -> tail   (the chain's tail is evicted first)
    assert bm.snapshot(0).free_queue == [3, 4, 2, 1, 0]
    assert kinds(bm)[3:] == [("free", 2, 1, 0), ("free", 1, 1, 0), ("free", 0, 1, 0)]
    bm.check_invariants()


def test_lazy_eviction_only_for_hashed_blocks() -> None:
    bm = fresh(3)
    run_prompt(bm, 1, [1, 2, 3])  # b0 full and hashed, b1 partial
    bm.free(1)
    # head -> b2 -> b1 -> b0* -> tail
    assert bm.num_cached_free_blocks == 1
    assert bm.snapshot(0).block_hashes[0] == hash_hex(hash_block(ROOT_HASH, (1, 2)))
    kinds(bm)
    assert bm.allocate(2, 4)  # pops b2, b1: neither hashed, so no evict event
    assert kinds(bm) == [("allocate", 2, 2, 1), ("allocate", 1, 2, 1)]
    assert bm.allocate(2, 6)  # pops b0*: its hash goes only now
    events = bm.drain_events()
    assert [(e.kind, e.block_id, e.ref_count) for e in events] == [
        ("evict", 0, 0), ("allocate", 0, 1)
    ]
    assert events[0].block_hash == hash_hex(hash_block(ROOT_HASH, (1, 2)))
    assert bm.lookup_prefix([1, 2]) == [] and bm.num_cached_free_blocks == 0
    bm.check_invariants()


def test_prefix_hit_revives_free_cached_block() -> None:
    bm = fresh(6)
    run_prompt(bm, 1, [1, 2, 3, 4, 5])  # b0, b1 hashed
    bm.free(1)
    # head -> b3 -> b4 -> b5 -> b2 -> b1* -> b0* -> tail
    kinds(bm)
    hits = bm.lookup_prefix([1, 2, 3, 4, 9])
    assert hits == [0, 1] and bm.drain_events() == []  # lookup is pure
    assert bm.num_blocks_needed(2, 5, hits) == 3  # two revived + one new
    assert bm.allocate(2, 5, hits)
    # head -> b4 -> b5 -> b2 -> tail   (b0, b1 left from the middle; b3 popped)
    assert bm.snapshot(0).free_queue == [4, 5, 2]
    assert kinds(bm) == [("touch", 0, 2, 1), ("touch", 1, 2, 1), ("allocate", 3, 2, 1)]
    assert bm.block_table(2) == [0, 1, 3] and bm.num_cached_free_blocks == 0
    bm.check_invariants()


def test_prefix_hit_on_block_in_use() -> None:
    bm = fresh(6)
    run_prompt(bm, 1, [1, 2, 3])
    kinds(bm)
    hits = bm.lookup_prefix([1, 2, 7])
    assert hits == [0]
    assert bm.num_blocks_needed(2, 3, hits) == 1  # in use: sharing costs no free block
    assert bm.allocate(2, 3, hits)
    assert kinds(bm) == [("touch", 0, 2, 2), ("allocate", 2, 2, 1)]
    assert bm.snapshot(0).owners[0] == 2  # last toucher
    bm.free(2)
    assert kinds(bm)[-1] == ("free", 0, 2, 1)
    assert bm.snapshot(0).owners[0] == 2  # replay only clears the owner at ref 0
    bm.check_invariants()


def test_same_prefix_computed_concurrently_keeps_first_hash() -> None:
    bm = fresh(6)
    assert bm.allocate(1, 2) and bm.allocate(2, 2)
    bm.cache_blocks(1, [5, 6], 2)
    bm.cache_blocks(2, [5, 6], 2)
    assert kinds(bm)[2:] == [("cache", 0, 1, 1)]  # request 2's b1 stays unhashed
    assert bm.lookup_prefix([5, 6]) == [0]
    bm.check_invariants()


def test_collision_guard_compares_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: 42)
    bm = fresh(6)
    run_prompt(bm, 1, [1, 2])
    assert bm.lookup_prefix([1, 2]) == [0]
    assert bm.lookup_prefix([3, 4]) == []  # same hash, other tokens
    run_prompt(bm, 2, [3, 4])  # colliding block stays unhashed
    assert bm.snapshot(0).block_hashes[1] is None


def test_collision_guard_compares_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: hash(tokens))
    bm = fresh(6)
    run_prompt(bm, 1, [1, 2, 5, 6])
    # (5, 6) is cached, but computed after (1, 2): useless as a prompt's first block.
    assert bm.lookup_prefix([5, 6]) == []
    assert bm.lookup_prefix([1, 2, 5, 6]) == [0, 1]


def test_failed_allocate_changes_nothing() -> None:
    bm = fresh(4)
    run_prompt(bm, 1, [1, 2, 3, 4])
    bm.free(1)
    run_prompt(bm, 2, [8, 8, 8])  # takes b2, b3
    # head -> b1* -> b0* -> tail
    before, table = bm.snapshot(0), list(bm.block_table(2))
    bm.drain_events()
    hits = bm.lookup_prefix([1, 2, 3, 4])
    assert not bm.can_allocate(3, 7, hits)  # 2 revived + 2 new > 2 free
    assert not bm.allocate(3, 7, hits)
    assert not bm.allocate(2, 9)  # grow by 3 blocks
    assert bm.snapshot(0) == before and bm.block_table(2) == table
    assert bm.drain_events() == []
    bm.check_invariants()


def test_stale_or_late_prefix_hits_rejected() -> None:
    bm = fresh(3)
    run_prompt(bm, 1, [1, 2, 3])
    with pytest.raises(ValueError):
        bm.allocate(1, 4, [0])  # hits only on a request's first allocation
    with pytest.raises(ValueError):
        bm.allocate(2, 4, [1])  # b1 is not a cached prefix block


def test_prefix_caching_off() -> None:
    bm = fresh(caching=False)
    run_prompt(bm, 1, [1, 2, 3, 4])
    bm.free(1)
    assert bm.lookup_prefix([1, 2, 3, 4]) == [] and bm.num_cached_free_blocks == 0
    assert {e.kind for e in bm.drain_events()} == {"allocate", "free"}


def test_lookup_respects_max_blocks() -> None:
    bm = fresh()
    run_prompt(bm, 1, [1, 2, 3, 4])
    assert bm.lookup_prefix([1, 2, 3, 4], max_blocks=1) == [0]
    assert bm.lookup_prefix([1, 2, 3, 4, 5]) == [0, 1]


def test_events_replay_to_snapshot() -> None:
    bm = fresh()
    state = BlockState.from_keyframe(bm.snapshot(0))
    run_prompt(bm, 1, [1, 2, 3, 4, 5])
    bm.free(1)
    run_prompt(bm, 2, [1, 2, 9, 9, 9, 9], bm.lookup_prefix([1, 2, 9, 9, 9, 9]))
    for e in bm.drain_events():
        apply_block_event(state, e)
    assert state.to_keyframe(1) == bm.snapshot(1)


def test_hash_is_stable_across_processes() -> None:
    code = "from engine.block_manager import *; print(hash_hex(hash_block(ROOT_HASH, (1, 2))))"
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        outs.add(proc.stdout.strip())
    assert outs == {hash_hex(hash_block(ROOT_HASH, (1, 2)))}


# ---- random operation sequences ----

# Shared prompt prefixes, so random prompts hit each other's cached blocks.
PREFIXES = ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 11, 12, 13, 14], [20, 21, 22, 23, 24])


@dataclass(slots=True)
class _Req:
    """The test's own view of a running request."""

    tokens: list[int]
    num_computed: int
    num_allocated: int  # tokens the block table covers


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit / grow / compute+cache / free / lookup on a small pool; after every rule the
    invariants hold and the drained events replay onto the previous state to give `snapshot()`."""

    def __init__(self) -> None:
        super().__init__()
        self.reqs: dict[int, _Req] = {}
        self.next_rid = 0

    @initialize(num_blocks=st.integers(6, 16), block_size=st.integers(1, 4),
                caching=st.sampled_from([True, True, True, False]))
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.replayed = BlockState.from_keyframe(self.bm.snapshot(0))

    def _pick(self, pick: int) -> tuple[int, _Req]:
        rid = sorted(self.reqs)[pick % len(self.reqs)]
        return rid, self.reqs[rid]

    def _allocate(self, rid: int, num_tokens: int, hits: list[int]) -> bool:
        """allocate, checking the result against can_allocate and the LRU pop order."""
        self._replay()  # so a failed allocate can be seen to emit nothing
        bm, before = self.bm, self.bm.snapshot(0)
        old_len = len(bm.block_table(rid)) if rid in self.reqs else 0
        needed = bm.num_blocks_needed(rid, num_tokens, hits)
        ok = bm.allocate(rid, num_tokens, hits)
        assert ok == (needed <= len(before.free_queue))
        if not ok:
            assert bm.snapshot(0) == before and bm.drain_events() == []
            return False
        table = bm.block_table(rid)
        assert len(table) == max(old_len + len(hits), -(-num_tokens // bm.block_size))
        queue = [b for b in before.free_queue if b not in hits]
        new = table[old_len + len(hits):]
        assert new == queue[:len(new)], "new blocks must come from the free-queue head"
        return True

    def _admit(self, tokens: list[int], chunk: int) -> None:
        """Schedule a prompt's first chunk the way the scheduler does: lookup, allocate, cache."""
        bs = self.bm.block_size
        hits = self.bm.lookup_prefix(tokens, max_blocks=(len(tokens) - 1) // bs)
        for i, b in enumerate(hits):  # a hit's stored tokens are the prompt's
            assert self.bm._blocks[b].token_ids == tuple(tokens[i * bs:(i + 1) * bs])
        revived = any(self.bm._blocks[b].ref_count == 0 for b in hits)
        num_tokens = min(len(tokens), len(hits) * bs + chunk)
        rid, self.next_rid = self.next_rid, self.next_rid + 1
        if self._allocate(rid, num_tokens, hits):
            self.reqs[rid] = _Req(tokens, num_tokens, num_tokens)
            self.bm.cache_blocks(rid, tokens, num_tokens)
            event(f"admitted with {min(len(hits), 2)}+ prefix hits")
            if revived:
                event("prefix hit revived a free cached block")
        else:
            event("admit failed: out of blocks")

    def _free(self, rid: int) -> None:
        before, table = self.bm.snapshot(0), self.bm.block_table(rid)
        released = [b for b in reversed(table) if before.ref_counts[b] == 1]
        self.bm.free(rid)
        del self.reqs[rid]
        assert table == [] and self.bm.snapshot(0).free_queue == before.free_queue + released

    @rule(prefix=st.integers(0, 2), cut=st.integers(3, 10),
          suffix=st.lists(st.integers(0, 3), max_size=3), chunk=st.integers(1, 16))
    def admit(self, prefix: int, cut: int, suffix: list[int], chunk: int) -> None:
        self.bm.step += 1
        tokens = PREFIXES[prefix][:cut] + suffix
        if tokens:
            self._admit(tokens, chunk)

    @rule(pick=st.integers(0, 100), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def grow(self, pick: int, new: list[int]) -> None:
        """Append tokens (decode or a new turn) and make room; nothing computed yet."""
        self.bm.step += 1
        if not self.reqs:
            return
        rid, req = self._pick(pick)
        req.tokens = req.tokens + new  # a fresh list: the old one may be a shared prefix
        if self._allocate(rid, len(req.tokens), []):
            req.num_allocated = len(req.tokens)

    @rule(pick=st.integers(0, 100), n=st.integers(1, 12))
    def compute(self, pick: int, n: int) -> None:
        self.bm.step += 1
        if not self.reqs:
            return
        rid, req = self._pick(pick)
        bs, old_full = self.bm.block_size, req.num_computed // self.bm.block_size
        req.num_computed = min(req.num_allocated, req.num_computed + n)
        self.bm.cache_blocks(rid, req.tokens, req.num_computed)
        if not self.bm.enable_prefix_caching:
            return
        parent = ROOT_HASH
        for i, b in enumerate(self.bm.block_table(rid)[:req.num_computed // bs]):
            tokens = tuple(req.tokens[i * bs:(i + 1) * bs])
            parent = hash_block(parent, tokens)
            if i < old_full:
                continue  # cached earlier; its twin may since have been evicted
            block, holder = self.bm._blocks[b], self.bm._cached.get(parent)
            # Hashed under its chained hash, or a twin computed first holds the hash.
            assert holder is not None and holder.token_ids == tokens
            assert block.block_hash in (parent, None) and (holder is block) == (
                block.block_hash is not None
            )

    @rule(pick=st.integers(0, 100))
    def free(self, pick: int) -> None:
        self.bm.step += 1
        if self.reqs:
            self._free(self._pick(pick)[0])

    @rule()
    def finish_oldest(self) -> None:
        # Requests mostly leave in arrival order; a second way out keeps the pool from silting up.
        self.bm.step += 1
        if self.reqs:
            self._free(min(self.reqs))

    @rule(pick=st.integers(0, 100), chunk=st.integers(1, 12))
    def preempt_and_readmit(self, pick: int, chunk: int) -> None:
        """Recompute preemption: the freed prompt should re-hit its own cached blocks."""
        self.bm.step += 1
        if self.reqs:
            rid, req = self._pick(pick)
            self._free(rid)
            self._admit(req.tokens, chunk)

    @rule(prefix=st.integers(0, 2), extra=st.lists(st.integers(0, 3), max_size=4))
    def lookup_is_pure(self, prefix: int, extra: list[int]) -> None:
        before = self.bm.snapshot(0)
        self.bm.lookup_prefix(PREFIXES[prefix] + extra)
        assert self.bm.snapshot(0) == before

    def _replay(self) -> None:
        for e in self.bm.drain_events():
            assert e.step == self.bm.step
            if e.kind == "evict":
                event("lazy eviction")
            apply_block_event(self.replayed, e)

    @invariant()
    def consistent_and_replayable(self) -> None:
        bm = self.bm
        bm.check_invariants()
        self._replay()
        snap = bm.snapshot(bm.step)
        assert self.replayed.to_keyframe(bm.step) == snap
        assert bm.num_free_blocks == len(snap.free_queue) == bm.num_blocks - bm.num_used_blocks
        assert bm.num_cached_free_blocks == sum(snap.block_hashes[b] is not None
                                                for b in snap.free_queue)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
