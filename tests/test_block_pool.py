"""The block pool and its group managers: one test per vLLM v1 rule (vLLM 0.33.0), then a
random state machine checking every invariant and that the emitted events replay
(`engine.trace.apply_block_event`) to the same state, with one and with two groups.

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

import engine.kv_cache.group_manager as group_manager_module
from engine.kv_cache import ROOT_HASH, KVCacheManager, hash_block, hash_hex, make_groups
from engine.kv_cache.layout import parse_policy
from engine.models.config import TINY_LLAMA
from engine.trace import BlockState, apply_block_event


def groups_for(policy: str, block_size: int):
    regions = parse_policy(policy, TINY_LLAMA.num_layers, TINY_LLAMA.num_kv_heads)
    return make_groups(regions, lambda heads: TINY_LLAMA.kv_cache_spec(block_size, "fp32", heads))


def fresh(num_blocks: int = 6, block_size: int = 2, caching: bool = True,
          policy: str = "full") -> KVCacheManager:
    kv = KVCacheManager(groups_for(policy, block_size), num_blocks, caching)
    kv.check_invariants()
    return kv


def kinds(kv: KVCacheManager) -> list[tuple[str, int, int | None, int]]:
    return [(e.kind, e.block_id, e.request_id, e.ref_count) for e in kv.drain_events()]


def table(kv: KVCacheManager, rid: int) -> list[int]:
    (t,) = kv.block_tables(rid)
    return t


def hits(kv: KVCacheManager, tokens: list[int], max_blocks: int | None = None) -> list[int]:
    (h,) = kv.lookup_prefix(tokens, max_blocks)
    return h


def run_prompt(kv: KVCacheManager, rid: int, tokens: list[int], cached: list[int] | None = None):
    """Admit a request (with prefix hits), compute all its tokens and cache its full blocks."""
    assert kv.allocate(rid, len(tokens), (cached,) if cached else ())
    kv.cache_blocks(rid, tokens, len(tokens))
    kv.check_invariants()


def test_initial_state() -> None:
    kv = fresh(4)
    # head -> b0 -> b1 -> b2 -> b3 -> tail
    snap = kv.snapshot(0)
    assert snap.free_queue == [0, 1, 2, 3]
    assert snap.ref_counts == [0] * 4 and snap.owners == [None] * 4
    assert snap.groups == [None] * 4
    assert (kv.num_free_blocks, kv.num_used_blocks, kv.num_cached_free_blocks) == (4, 0, 0)
    assert kv.null_block == 4  # a storage page beyond the pool


def test_allocate_pops_head_and_table_is_live() -> None:
    kv = fresh()
    live = table(kv, 7)
    kv.step = 3
    assert kv.allocate(7, 3)  # 3 tokens, block size 2 -> 2 blocks
    # head -> b2 -> b3 -> b4 -> b5 -> tail
    assert live == [0, 1] and live is table(kv, 7)
    assert kv.allocate(7, 5)  # grow by one block
    assert live == [0, 1, 2]
    events = kv.drain_events()
    assert [(e.kind, e.block_id, e.ref_count, e.group_id) for e in events] == [
        ("allocate", 0, 1, 0), ("allocate", 1, 1, 0), ("allocate", 2, 1, 0)
    ]
    assert {e.step for e in events} == {3}
    kv.free(7)
    assert live == []  # a stale reference cannot read freed blocks
    kv.check_invariants()


def test_free_puts_unhashed_blocks_at_the_head_in_eviction_order() -> None:
    """vLLM 0.33.0 `free_blocks`: a block without a hash can never serve a hit, so it is
    reused first; a request's blocks are given in reverse (its tail evicted first)."""
    kv = fresh(5)
    assert kv.allocate(1, 6)
    # head -> b3 -> b4 -> tail
    kv.free(1)
    # head -> b2 -> b1 -> b0 -> b3 -> b4 -> tail
    assert kv.snapshot(0).free_queue == [2, 1, 0, 3, 4]
    # emitted so that inserting each at the head rebuilds the order
    assert kinds(kv)[3:] == [("free_head", 0, 1, 0), ("free_head", 1, 1, 0),
                             ("free_head", 2, 1, 0)]
    kv.check_invariants()


def test_hashed_blocks_go_to_the_tail_and_outlive_a_partial_block() -> None:
    kv = fresh(4)
    run_prompt(kv, 1, [1, 2, 3])  # b0 full and hashed, b1 partial
    # head -> b2 -> b3 -> tail
    kv.free(1)
    # head -> b1 -> b2 -> b3 -> b0* -> tail   (the partial block is reused first)
    assert kv.snapshot(0).free_queue == [1, 2, 3, 0]
    kinds(kv)
    assert kv.allocate(2, 6)  # pops b1, b2, b3: none hashed, so no evict event
    assert kinds(kv) == [("allocate", 1, 2, 1), ("allocate", 2, 2, 1), ("allocate", 3, 2, 1)]
    assert hits(kv, [1, 2, 9]) == [0]  # the prefix block survived
    kv.check_invariants()


def test_lazy_eviction_only_for_hashed_blocks() -> None:
    kv = fresh(3)
    run_prompt(kv, 1, [1, 2, 3])  # b0 full and hashed, b1 partial
    kv.free(1)
    # head -> b1 -> b2 -> b0* -> tail
    assert kv.num_cached_free_blocks == 1
    assert kv.snapshot(0).block_hashes[0] == hash_hex(hash_block(ROOT_HASH, (1, 2)))
    kinds(kv)
    assert kv.allocate(2, 4)  # pops b1, b2: neither hashed, so no evict event
    assert kinds(kv) == [("allocate", 1, 2, 1), ("allocate", 2, 2, 1)]
    assert kv.allocate(2, 6)  # pops b0*: its hash goes only now
    events = kv.drain_events()
    assert [(e.kind, e.block_id, e.ref_count) for e in events] == [
        ("evict", 0, 0), ("allocate", 0, 1)
    ]
    assert events[0].block_hash == hash_hex(hash_block(ROOT_HASH, (1, 2)))
    assert hits(kv, [1, 2]) == [] and kv.num_cached_free_blocks == 0
    kv.check_invariants()


def test_prefix_hit_revives_free_cached_block() -> None:
    kv = fresh(6)
    run_prompt(kv, 1, [1, 2, 3, 4, 5])  # b0, b1 hashed
    kv.free(1)
    # head -> b2 -> b3 -> b4 -> b5 -> b1* -> b0* -> tail
    kinds(kv)
    found = hits(kv, [1, 2, 3, 4, 9])
    assert found == [0, 1] and kv.drain_events() == []  # lookup is pure
    assert kv.num_blocks_needed(2, 5, (found,)) == 3  # two revived + one new
    assert kv.allocate(2, 5, (found,))
    # head -> b3 -> b4 -> b5 -> tail   (b0, b1 left from the middle; b2 popped)
    assert kv.snapshot(0).free_queue == [3, 4, 5]
    assert kinds(kv) == [("touch", 0, 2, 1), ("touch", 1, 2, 1), ("allocate", 2, 2, 1)]
    assert table(kv, 2) == [0, 1, 2] and kv.num_cached_free_blocks == 0
    kv.check_invariants()


def test_prefix_hit_on_block_in_use() -> None:
    kv = fresh(6)
    run_prompt(kv, 1, [1, 2, 3])
    kinds(kv)
    found = hits(kv, [1, 2, 7])
    assert found == [0]
    assert kv.num_blocks_needed(2, 3, (found,)) == 1  # in use: sharing costs no free block
    assert kv.allocate(2, 3, (found,))
    assert kinds(kv) == [("touch", 0, 2, 2), ("allocate", 2, 2, 1)]
    assert kv.snapshot(0).owners[0] == 2  # last toucher
    kv.free(2)
    assert ("free", 0, 2, 1) in kinds(kv)
    assert kv.snapshot(0).owners[0] == 2  # replay only clears the owner at ref 0
    kv.check_invariants()


def test_recomputed_block_is_cached_beside_its_twin() -> None:
    """vLLM 0.33.0: a block computed while an equal one is cached is cached too; a lookup takes
    the earliest, and evicting one copy leaves the hash findable in the other."""
    kv = fresh(4)
    assert kv.allocate(1, 2) and kv.allocate(2, 2)
    kv.cache_blocks(1, [5, 6], 2)
    kv.cache_blocks(2, [5, 6], 2)
    assert kinds(kv)[2:] == [("cache", 0, 1, 1), ("cache", 1, 2, 1)]
    assert hits(kv, [5, 6, 7]) == [0]
    kv.free(1)
    kv.free(2)
    # head -> b2 -> b3 -> b0* -> b1* -> tail
    assert kv.allocate(3, 6)  # pops b2, b3, then b0*: the first copy is evicted
    assert hits(kv, [5, 6, 7]) == [1]  # ... and the twin still serves the prefix
    assert kv.num_cached_free_blocks == 1
    kv.check_invariants()


def test_collision_guard_compares_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_manager_module, "hash_block", lambda parent, tokens: 42)
    kv = fresh(6)
    run_prompt(kv, 1, [1, 2])
    assert hits(kv, [1, 2]) == [0]
    assert hits(kv, [3, 4]) == []  # same hash, other tokens
    run_prompt(kv, 2, [3, 4])  # a colliding block is cached beside the other
    assert hits(kv, [3, 4]) == [1] and hits(kv, [1, 2]) == [0]


def test_collision_guard_compares_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_manager_module, "hash_block", lambda parent, tokens: hash(tokens))
    kv = fresh(6)
    run_prompt(kv, 1, [1, 2, 5, 6])
    # (5, 6) is cached, but computed after (1, 2): useless as a prompt's first block.
    assert hits(kv, [5, 6]) == []
    assert hits(kv, [1, 2, 5, 6]) == [0, 1]


def test_failed_allocate_changes_nothing() -> None:
    kv = fresh(4)
    run_prompt(kv, 1, [1, 2, 3, 4])
    kv.free(1)
    run_prompt(kv, 2, [8, 8, 8])  # takes b2, b3
    # head -> b1* -> b0* -> tail
    before, held = kv.snapshot(0), list(table(kv, 2))
    kv.drain_events()
    found = hits(kv, [1, 2, 3, 4])
    assert not kv.can_allocate(3, 7, (found,))  # 2 revived + 2 new > 2 free
    assert not kv.allocate(3, 7, (found,))
    assert not kv.allocate(2, 9)  # grow by 3 blocks
    assert kv.snapshot(0) == before and table(kv, 2) == held
    assert kv.drain_events() == []
    kv.check_invariants()


def test_stale_or_late_prefix_hits_rejected() -> None:
    kv = fresh(3)
    run_prompt(kv, 1, [1, 2, 3])
    with pytest.raises(ValueError):
        kv.allocate(1, 4, ([0],))  # hits only on a request's first allocation
    with pytest.raises(ValueError):
        kv.allocate(2, 4, ([1],))  # b1 is not a cached prefix block


def test_prefix_caching_off() -> None:
    kv = fresh(caching=False)
    run_prompt(kv, 1, [1, 2, 3, 4])
    kv.free(1)
    assert hits(kv, [1, 2, 3, 4]) == [] and kv.num_cached_free_blocks == 0
    assert {e.kind for e in kv.drain_events()} == {"allocate", "free_head"}


def test_lookup_respects_max_blocks() -> None:
    kv = fresh()
    run_prompt(kv, 1, [1, 2, 3, 4])
    assert hits(kv, [1, 2, 3, 4], max_blocks=1) == [0]
    assert hits(kv, [1, 2, 3, 4, 5]) == [0, 1]


def test_blocks_given_back_mid_request_leave_the_null_block() -> None:
    kv = fresh(6)
    run_prompt(kv, 1, [1, 2, 3, 4, 5, 6])  # b0, b1, b2 hashed
    kinds(kv)
    assert kv.remove_blocks(1, 0, [0, 1]) == [0, 1]
    # the table keeps its length: positions still map to slots; the null block is masked
    assert table(kv, 1) == [kv.null_block, kv.null_block, 2]
    assert kinds(kv) == [("drop", 0, 1, 0), ("drop", 1, 1, 0)]  # hashed: cached free
    assert kv.num_cached_free_blocks == 2
    kv.check_invariants()
    kv.free(1)  # the null slots are skipped
    assert kv.num_free_blocks == 6
    kv.check_invariants()


def test_two_groups_allocate_together_and_hit_a_common_prefix() -> None:
    kv = fresh(8, policy="0-0:full; 1-1:full")
    assert [g.layers for g in kv.groups] == [(0,), (1,)]
    run_prompt(kv, 1, [1, 2, 3, 4, 5])  # 3 blocks in each group
    assert kv.block_tables(1) == ([0, 1, 2], [3, 4, 5])
    assert [e.group_id for e in kv.drain_events() if e.kind == "allocate"] == [0] * 3 + [1] * 3
    kv.free(1)
    assert kv.lookup_prefix([1, 2, 3, 4, 9]) == ([0, 1], [3, 4])
    assert not kv.can_allocate(2, 17)  # 9 blocks per group > 8 in the pool
    snap = kv.snapshot(0)
    assert [snap.groups[b] for b in (0, 1, 3, 4)] == [0, 0, 1, 1]  # cached, keep their group
    assert [snap.groups[b] for b in (2, 5)] == [None, None]  # unhashed partial blocks
    kv.check_invariants()


def test_events_replay_to_snapshot() -> None:
    kv = fresh()
    state = BlockState.from_keyframe(kv.snapshot(0))
    run_prompt(kv, 1, [1, 2, 3, 4, 5])
    kv.free(1)
    run_prompt(kv, 2, [1, 2, 9, 9, 9, 9], hits(kv, [1, 2, 9, 9, 9, 9]))
    for e in kv.drain_events():
        apply_block_event(state, e)
    assert state.to_keyframe(1) == kv.snapshot(1)


def test_hash_is_stable_across_processes() -> None:
    code = "from engine.kv_cache import *; print(hash_hex(hash_block(ROOT_HASH, (1, 2))))"
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
    num_allocated: int  # tokens the block tables cover


class KVCacheMachine(RuleBasedStateMachine):
    """Random admit / grow / compute+cache / give back / free / lookup on a small pool with one
    or two groups; after every rule the invariants hold and the drained events replay onto the
    previous state to give `snapshot()`."""

    def __init__(self) -> None:
        super().__init__()
        self.reqs: dict[int, _Req] = {}
        self.next_rid = 0

    @initialize(num_blocks=st.integers(6, 16), block_size=st.integers(1, 4),
                caching=st.sampled_from([True, True, True, False]),
                policy=st.sampled_from(["full", "full", "0-0:full; 1-1:full"]))
    def setup(self, num_blocks: int, block_size: int, caching: bool, policy: str) -> None:
        self.kv = KVCacheManager(groups_for(policy, block_size), num_blocks, caching)
        self.replayed = BlockState.from_keyframe(self.kv.snapshot(0))

    def _pick(self, pick: int) -> tuple[int, _Req]:
        rid = sorted(self.reqs)[pick % len(self.reqs)]
        return rid, self.reqs[rid]

    def _allocate(self, rid: int, num_tokens: int, cached: tuple[list[int], ...]) -> bool:
        """allocate, checking the result against can_allocate and the LRU pop order."""
        self._replay()  # so a failed allocate can be seen to emit nothing
        kv, before = self.kv, self.kv.snapshot(0)
        old_lens = [len(t) for t in kv.block_tables(rid)] if rid in self.reqs else None
        needed = kv.num_blocks_needed(rid, num_tokens, cached)
        ok = kv.allocate(rid, num_tokens, cached)
        assert ok == (needed <= len(before.free_queue))
        if not ok:
            assert kv.snapshot(0) == before and kv.drain_events() == []
            return False
        queue = [b for b in before.free_queue if not any(b in c for c in cached)]
        new_blocks = []
        for g, live in enumerate(kv.block_tables(rid)):
            old = old_lens[g] if old_lens else 0
            hit = len(cached[g]) if cached else 0
            assert len(live) == max(old + hit, -(-num_tokens // kv.block_size))
            new_blocks += live[old + hit:]
        assert new_blocks == queue[:len(new_blocks)], "new blocks come from the queue's head"
        return True

    def _admit(self, tokens: list[int], chunk: int) -> None:
        """Schedule a prompt's first chunk the way the scheduler does: lookup, allocate, cache."""
        kv, bs = self.kv, self.kv.block_size
        cached = kv.lookup_prefix(tokens, max_blocks=(len(tokens) - 1) // bs)
        assert len({len(c) for c in cached}) == 1, "a hit is common to every group"
        for hits_of_group in cached:
            for i, b in enumerate(hits_of_group):  # a hit's stored tokens are the prompt's
                assert kv.pool.block(b).token_ids == tuple(tokens[i * bs:(i + 1) * bs])
        revived = any(kv.pool.block(b).ref_count == 0 for c in cached for b in c)
        num_tokens = min(len(tokens), len(cached[0]) * bs + chunk)
        rid, self.next_rid = self.next_rid, self.next_rid + 1
        if self._allocate(rid, num_tokens, cached if cached[0] else ()):
            self.reqs[rid] = _Req(tokens, num_tokens, num_tokens)
            kv.cache_blocks(rid, tokens, num_tokens)
            event(f"admitted with {min(len(cached[0]), 2)}+ prefix hits")
            if revived:
                event("prefix hit revived a free cached block")
        else:
            event("admit failed: out of blocks")

    def _free(self, rid: int) -> None:
        before, tables = self.kv.snapshot(0), self.kv.block_tables(rid)
        released = [b for t in tables for b in reversed(t)
                    if b != self.kv.null_block and before.ref_counts[b] == 1]
        self.kv.free(rid)
        del self.reqs[rid]
        after = self.kv.snapshot(0).free_queue
        assert all(t == [] for t in tables) and sorted(after) == sorted(before.free_queue
                                                                          + released)
        hashed = [b for b in released if before.block_hashes[b] is not None]
        assert after[len(after) - len(hashed):] == hashed, "hashed blocks join the tail"

    @rule(prefix=st.integers(0, 2), cut=st.integers(3, 10),
          suffix=st.lists(st.integers(0, 3), max_size=3), chunk=st.integers(1, 16))
    def admit(self, prefix: int, cut: int, suffix: list[int], chunk: int) -> None:
        self.kv.step += 1
        tokens = PREFIXES[prefix][:cut] + suffix
        if tokens:
            self._admit(tokens, chunk)

    @rule(pick=st.integers(0, 100), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def grow(self, pick: int, new: list[int]) -> None:
        """Append tokens (decode or a new turn) and make room; nothing computed yet."""
        self.kv.step += 1
        if not self.reqs:
            return
        rid, req = self._pick(pick)
        req.tokens = req.tokens + new  # a fresh list: the old one may be a shared prefix
        if self._allocate(rid, len(req.tokens), ()):
            req.num_allocated = len(req.tokens)

    @rule(pick=st.integers(0, 100), n=st.integers(1, 12))
    def compute(self, pick: int, n: int) -> None:
        self.kv.step += 1
        if not self.reqs:
            return
        rid, req = self._pick(pick)
        kv, bs = self.kv, self.kv.block_size
        req.num_computed = min(req.num_allocated, req.num_computed + n)
        kv.cache_blocks(rid, req.tokens, req.num_computed)
        if not kv.enable_prefix_caching:
            return
        for g, live in enumerate(kv.block_tables(rid)):
            parent = ROOT_HASH
            for i, b in enumerate(live[:req.num_computed // bs]):
                tokens = tuple(req.tokens[i * bs:(i + 1) * bs])
                parent = hash_block(parent, tokens)
                if b == kv.null_block:
                    continue
                block = kv.pool.block(b)
                # hashed under its chained hash (a twin may hold the same hash: vLLM 0.33)
                assert block.block_hash == parent and block.token_ids == tokens
                assert kv.pool.get_cached_block(parent, block.parent_hash, tokens, g) is not None

    @rule(pick=st.integers(0, 100), first=st.integers(0, 8), count=st.integers(1, 3),
          group=st.integers(0, 1))
    def give_back(self, pick: int, first: int, count: int, group: int) -> None:
        """A retention policy's move: blocks leave the middle of a table for the null block."""
        self.kv.step += 1
        if not self.reqs:
            return
        rid, _ = self._pick(pick)
        g = group % len(self.kv.groups)
        live = self.kv.block_tables(rid)[g]
        indexes = [i for i in range(first, first + count) if i < len(live)]
        expected = [live[i] for i in indexes if live[i] != self.kv.null_block]
        assert self.kv.remove_blocks(rid, g, indexes) == expected
        assert all(live[i] == self.kv.null_block for i in indexes)
        if expected:
            event("blocks given back mid-request")

    @rule(pick=st.integers(0, 100))
    def free(self, pick: int) -> None:
        self.kv.step += 1
        if self.reqs:
            self._free(self._pick(pick)[0])

    @rule()
    def finish_oldest(self) -> None:
        # Requests mostly leave in arrival order; a second way out keeps the pool from silting up.
        self.kv.step += 1
        if self.reqs:
            self._free(min(self.reqs))

    @rule(pick=st.integers(0, 100), chunk=st.integers(1, 12))
    def preempt_and_readmit(self, pick: int, chunk: int) -> None:
        """Recompute preemption: the freed prompt should re-hit its own cached blocks."""
        self.kv.step += 1
        if self.reqs:
            rid, req = self._pick(pick)
            self._free(rid)
            self._admit(req.tokens, chunk)

    @rule(prefix=st.integers(0, 2), extra=st.lists(st.integers(0, 3), max_size=4))
    def lookup_is_pure(self, prefix: int, extra: list[int]) -> None:
        before = self.kv.snapshot(0)
        self.kv.lookup_prefix(PREFIXES[prefix] + extra)
        assert self.kv.snapshot(0) == before

    def _replay(self) -> None:
        for e in self.kv.drain_events():
            assert e.step == self.kv.step
            if e.kind == "evict":
                event("lazy eviction")
            apply_block_event(self.replayed, e)

    @invariant()
    def consistent_and_replayable(self) -> None:
        kv = self.kv
        kv.check_invariants()
        self._replay()
        snap = kv.snapshot(kv.step)
        assert self.replayed.to_keyframe(kv.step) == snap
        assert kv.num_free_blocks == len(snap.free_queue) == kv.num_blocks - kv.num_used_blocks
        assert kv.num_cached_free_blocks == sum(snap.block_hashes[b] is not None
                                                for b in snap.free_queue)


KVCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestKVCacheMachine = KVCacheMachine.TestCase
