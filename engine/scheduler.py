"""Scheduler: continuous batching under a per-step token budget, chunked prefill, and
recompute preemption of the newest request when KV blocks run out (vLLM v1 policy).

Policy, in order, each step:
1. Running requests (oldest first) get their next tokens: one for a decode, the rest of the
   prompt (up to the remaining budget) for a prefill chunk. If the KV cache cannot grow a
   request's block tables, the newest running request is preempted: its blocks are freed
   (hashed blocks stay cached, so it re-hits them when it returns), its computed tokens are
   forgotten, and it goes back to the front of the waiting queue.
2. If nothing was preempted, waiting requests (first come, first served) are admitted while
   there are free sequence slots, budget and blocks, each starting from its longest prefix hit.
After the model ran, `update_computed` moves each request forward and registers its blocks
that became full, so the KV cache manager is driven by the scheduler alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache.manager import KVCacheManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    """What one step computes: (sequence, number of new tokens) in batch order."""

    batch: list[tuple[Sequence, int]] = field(default_factory=list)
    scheduled_new: list[Sequence] = field(default_factory=list)  # admitted from waiting
    preempted: list[Sequence] = field(default_factory=list)
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.batch


class Scheduler:
    """Owns the waiting queue and the running list; the KV cache manager owns the memory, and
    only the scheduler calls it."""

    def __init__(
        self,
        kv_cache: KVCacheManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_prefix_caching: bool,
    ):
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, step: int) -> SchedulerOutput:
        """Choose step `step`'s batch (block events of this step carry its number)."""
        self.kv_cache.step = step
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def update_computed(self, seq: Sequence, num_new: int) -> None:
        """`num_new` more of the request's tokens are in the cache: register its blocks that
        became full (prefix caching), and let each group's retention policy give blocks back."""
        seq.num_computed_tokens += num_new
        if self.enable_prefix_caching:
            self.kv_cache.cache_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)
        self.kv_cache.retain(seq.request_id, seq.num_computed_tokens, seq.num_prompt_tokens)

    def finish(self, seq: Sequence) -> None:
        """Release a finished request's blocks (hashed ones stay cached for later hits)."""
        self.running.remove(seq)
        self.kv_cache.free(seq.request_id)
        seq.block_tables = ()
        seq.status = SequenceStatus.FINISHED

    # ----------------------------------------------------------------------------------------
    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv_cache.allocate(
                seq.request_id, seq.num_computed_tokens + num_new
            ):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.batch.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request being scheduled preempted itself: nothing older can be freed
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        kv = self.kv_cache
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            cached: tuple[list[int], ...] | tuple[()] = ()
            if self.enable_prefix_caching:
                # Leave at least the last token to compute: its logits pick the next token.
                max_blocks = (seq.num_tokens - 1) // kv.block_size
                cached = kv.lookup_prefix(seq.token_ids, max_blocks=max_blocks)
            num_cached = len(cached[0]) * kv.block_size if cached else 0
            num_new = min(seq.num_tokens - num_cached, budget)
            if not kv.allocate(seq.request_id, num_cached + num_new, cached if num_cached else ()):
                break  # first come, first served: do not let later requests jump the queue
            self.waiting.popleft()
            seq.block_tables = kv.block_tables(seq.request_id)
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            if seq.num_cached_prompt_tokens is None:
                seq.num_cached_prompt_tokens = min(num_cached, seq.num_prompt_tokens)
            if self.enable_prefix_caching:
                out.prefix_query_tokens += seq.num_tokens
                out.prefix_hit_tokens += num_cached
            self.running.append(seq)
            out.scheduled_new.append(seq)
            out.batch.append((seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv_cache.free(seq.request_id)
        seq.block_tables = ()
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
