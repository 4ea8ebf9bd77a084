"""The step loop: schedule -> run the model -> sample -> update requests -> one StepRecord.

`LLMEngine` knows nothing of wall-clock arrivals or sinks; `engine.run` drives it with a
workload and hands its records to a TraceSink.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.config import RunConfig
from engine.device import dtype_name
from engine.kv_cache.manager import KVCacheManager
from engine.kv_cache.residual import residual_capacity
from engine.kv_cache.storage import PagedKVCache
from engine.memory_profile import choose_blocks, finish_profile, start_profile
from engine.model_runner import ModelRunner
from engine.models.loader import LoadedModel
from engine.roofline import bandwidth, decode_bound_s
from engine.sampling import Sampler
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.telemetry import MemoryProbe, TelemetrySampler
from engine.trace import BlockEvent, RequestEvent, RequestRecord, StepRecord


@dataclass(slots=True)
class StepOutput:
    record: StepRecord
    block_events: list[BlockEvent]
    request_events: list[RequestEvent]
    finished: list[RequestRecord] = field(default_factory=list)


class LLMEngine:
    """One model, one paged KV cache (its groups, one block pool), one scheduler.

    Not thread-safe: one thread drives `step()`. Several engines may live in one process
    (the dashboard runs experiments while another run replays), so nothing here is global.
    """

    def __init__(self, config: RunConfig, loaded: LoadedModel):
        self.config = config
        self.loaded = loaded
        self.device = loaded.device
        self.kv_dtype_name = config.resolved_kv_dtype(self.device.type, dtype_name(loaded.dtype))
        # The model's spec, grouped by the config's policy; a byte budget buys blocks at the
        # page size of the cache's real dtype.
        self.kv_groups = config.kv_groups(self.kv_dtype_name)
        # Everything but the cache is measured first, so a memory fraction can size it (vLLM)
        self.memory_profile = start_profile(config, loaded, self.kv_groups)
        self.num_blocks = choose_blocks(config, self.memory_profile, self.kv_groups,
                                        config.blocks_needed(self.kv_groups))
        self.kv_cache = PagedKVCache(
            self.kv_groups, self.num_blocks, self.device,
            residual_slots=residual_capacity(config.max_num_batched_tokens, config.max_num_seqs,
                                             config.block_size),
            commit=self.device.type == "cpu")
        finish_profile(self.memory_profile, self.kv_cache)
        self.kv_cache_manager = KVCacheManager(self.kv_groups, self.num_blocks,
                                               config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.runner = ModelRunner(loaded, self.kv_cache, config.mla_path)
        self.sampler = Sampler(config.seed)
        self.memory = MemoryProbe(self.device)
        self.telemetry: TelemetrySampler | None = None  # set by engine.run while it runs
        self.bandwidth = bandwidth(self.device)  # bytes/s, for each decode step's roofline
        self.max_model_len = config.resolved_max_model_len
        self.eos_token_id = loaded.tokenizer.eos_token_id if loaded.tokenizer else None
        self.step_count = 0
        self.pending_request_events: list[RequestEvent] = []

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, seq: Sequence, now: float) -> RequestRecord | None:
        """Queue a request, or reject it (returned as its final record) if it cannot run."""
        seq.arrival_t = now
        problem = self._admission_problem(seq)
        if problem is not None:
            seq.finish_reason = f"rejected: {problem}"
            seq.finish_t = now
            return self.request_record(seq)
        self.scheduler.add(seq)
        self.pending_request_events.append(
            RequestEvent(self.step_count + 1, now, seq.request_id, "arrive")
        )
        return None

    def _admission_problem(self, seq: Sequence) -> str | None:
        if seq.num_prompt_tokens == 0:
            return "the prompt is empty; give at least one token"
        if seq.num_prompt_tokens >= self.max_model_len:
            return (f"the prompt has {seq.num_prompt_tokens} tokens but max_model_len is "
                    f"{self.max_model_len} (room is needed for one generated token); shorten "
                    "the prompt or raise max_model_len")
        vocab = self.loaded.config.vocab_size
        outside = next((t for t in seq.token_ids if not 0 <= t < vocab), None)
        if outside is not None:  # the embedding lookup would fail in the middle of a step
            return (f"token id {outside} is outside the model's vocabulary (0..{vocab - 1}); "
                    "check the prompt_token_ids")
        return None

    def step(self, clock_start: float) -> StepOutput:
        started = time.monotonic()
        self.step_count += 1
        sched = self.scheduler.schedule(self.step_count)
        request_events = self.pending_request_events
        self.pending_request_events = []
        now = started - clock_start
        request_events += [RequestEvent(self.step_count, now, s.request_id, "preempt")
                           for s in sched.preempted]
        request_events += [RequestEvent(self.step_count, now, s.request_id, "schedule")
                           for s in sched.scheduled_new]
        # A decode computes the one token sampled last step; recomputing a preempted request's
        # outputs is prefill work, like its prompt.
        num_decode = sum(1 for seq, n in sched.batch
                         if n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens)
        tokens: list[int] = []
        if sched.batch:
            logits = self.runner.execute(sched.batch)
            # Each row draws from its request's own stream at its next output position, so a
            # request's tokens do not depend on its batch, preemptions or the KV budget.
            keys = [(seq.request_id, seq.num_output_tokens) for seq, n in sched.batch
                    if seq.num_computed_tokens + n == seq.num_tokens]
            tokens = self.sampler(logits, self.config.sampling, keys)
            for group_id, request_id, mass in self.runner.attention_mass:
                self.kv_cache_manager.add_attention(group_id, request_id, mass)
        now = time.monotonic() - clock_start
        finished = self._update_sequences(sched, tokens, now, request_events)
        block_events = self.kv_cache_manager.drain_events()
        if self.kv_cache.residual is not None:  # open blocks the pool took back
            self.kv_cache.residual.release([e.block_id for e in block_events if e.ref_count == 0
                                            and e.kind in ("free", "free_head", "drop")])
        record = self._step_record(sched, block_events, num_decode, len(tokens), started,
                                   clock_start)
        return StepOutput(record, block_events, request_events, finished)

    def _update_sequences(
        self, sched: SchedulerOutput, tokens: list[int], now: float,
        request_events: list[RequestEvent],
    ) -> list[RequestRecord]:
        finished = []
        sampled = iter(tokens)
        for seq, num_new in sched.batch:
            self.scheduler.update_computed(seq, num_new)
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk that has not reached the end of the prompt yet
            seq.token_ids.append(next(sampled))
            if seq.first_token_t is None:
                seq.first_token_t = now
                request_events.append(
                    RequestEvent(self.step_count, now, seq.request_id, "first_token"))
            reason = self._finish_reason(seq)
            if reason is not None:
                seq.finish_reason, seq.finish_t = reason, now
                self.scheduler.finish(seq)
                request_events.append(
                    RequestEvent(self.step_count, now, seq.request_id, "finish"))
                finished.append(self.request_record(seq))
        return finished

    def _finish_reason(self, seq: Sequence) -> str | None:
        sampling = self.config.sampling
        if not sampling.ignore_eos and seq.token_ids[-1] == self.eos_token_id:
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _step_record(
        self, sched: SchedulerOutput, events: list[BlockEvent], decode: int,
        num_generated: int, started: float, clock_start: float,
    ) -> StepRecord:
        kv = self.kv_cache_manager
        num_tokens = sum(n for _, n in sched.batch)
        memory = self.memory.read()
        latest = self.telemetry.latest if self.telemetry is not None else None
        kv_used = kv.num_used_blocks * self.kv_cache.page_size_bytes
        ended = time.monotonic()
        return StepRecord(
            step=self.step_count,
            t=ended - clock_start,
            duration_s=ended - started,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_prefill_tokens=num_tokens - decode,
            num_decode_tokens=decode,
            num_generated_tokens=num_generated,
            num_preempted=len(sched.preempted),
            blocks_used=kv.num_used_blocks,
            blocks_free=kv.num_free_blocks,
            blocks_cached_free=kv.num_cached_free_blocks,
            prefix_query_tokens=sched.prefix_query_tokens,
            prefix_hit_tokens=sched.prefix_hit_tokens,
            num_evicted=sum(1 for e in events if e.kind == "evict"),
            kv_bytes_used=kv_used,
            kv_bytes_capacity=self.kv_cache.capacity_bytes,
            torch_allocated_bytes=memory.torch_allocated_bytes,
            torch_reserved_bytes=memory.torch_reserved_bytes,
            # the sampler's latest reading, joined here by time (the step never calls NVML)
            nvml_used_bytes=latest.gpu_memory_used_bytes if latest else None,
            gpu_utilization_pct=latest.gpu_util_pct if latest else None,
            gpu_power_w=latest.power_w if latest else None,
            rss_bytes=memory.rss_bytes,
            roofline_s=(decode_bound_s(self.memory_profile.weights_bytes, kv_used,
                                       self.bandwidth)
                        if decode and decode == num_tokens else None),
        )

    def request_record(self, seq: Sequence) -> RequestRecord:
        return RequestRecord(
            request_id=seq.request_id,
            arrival_t=seq.arrival_t,
            prompt_tokens=seq.num_prompt_tokens,
            cached_prompt_tokens=seq.num_cached_prompt_tokens or 0,
            output_tokens=seq.num_output_tokens,
            first_token_t=seq.first_token_t,
            finish_t=seq.finish_t,
            num_preemptions=seq.num_preemptions,
            finish_reason=seq.finish_reason or "aborted",
            label=seq.label,
        )
