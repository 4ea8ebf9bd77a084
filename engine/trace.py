"""Trace types: the contract between the engine, the store and the dashboard pages.

All times are seconds from run start (monotonic clock); ids are integers (a workload file's
own request ids are kept as `RequestRecord.label`). Steps are numbered
from 1; the keyframe with step 0 is the state before the first step. Block events carry the
step they happened in and are emitted in order; replaying them in order on top of the nearest
earlier keyframe rebuilds the block state at any step (see `apply_block_event`).

These dataclasses are the one definition of the trace: the store derives its table columns and
the trace file its Parquet schemas from their fields (store/trace_columns.py). A field's
annotation (int, float, str, optionally `| None`) is its column type; `metadata={"codes": ...}`
stores a kind as a small integer code; a default is what older traces that lack the field get.
So a new per-step field is one line here plus a store migration.

The engine only calls a `TraceSink`; it never touches a database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

# "free" drops one reference; a block that reaches 0 joins the free queue's tail (evicted
# last). "free_head" is a free to 0 of a block with no hash, which can never serve a prefix hit,
# so it joins the head (reused first), as vLLM 0.33 does. "drop" is a retention policy giving a
# block back mid-request (its `reason` says why); at 0 it joins the tail if hashed, else the
# head. Codes are indexes: only append.
BlockEventKind = Literal["allocate", "touch", "cache", "free", "evict", "free_head", "drop"]
BLOCK_EVENT_KINDS: tuple[str, ...] = ("allocate", "touch", "cache", "free", "evict", "free_head",
                                      "drop")

RequestEventKind = Literal["arrive", "schedule", "first_token", "preempt", "finish"]
REQUEST_EVENT_KINDS: tuple[str, ...] = ("arrive", "schedule", "first_token", "preempt", "finish")


@dataclass(slots=True)
class StepRecord:
    """One engine step: what ran, how long it took, and the memory picture after it."""

    step: int
    t: float  # seconds from run start at the end of the step
    duration_s: float
    num_running: int
    num_waiting: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_generated_tokens: int  # tokens sampled this step (decodes + prefills that completed)
    num_preempted: int
    blocks_used: int  # ref_count > 0
    blocks_free: int  # ref_count == 0 (includes cached free blocks)
    blocks_cached_free: int  # free but still hashed: reusable by a prefix hit until evicted
    prefix_query_tokens: int  # prompt tokens looked up in the prefix cache this step
    prefix_hit_tokens: int  # of those, tokens found in cached blocks
    num_evicted: int  # cached blocks whose hash was dropped for reuse this step
    kv_bytes_used: int
    kv_bytes_capacity: int
    torch_allocated_bytes: int | None = None  # CUDA only
    torch_reserved_bytes: int | None = None  # CUDA only
    nvml_used_bytes: int | None = None
    gpu_utilization_pct: float | None = None
    gpu_power_w: float | None = None
    rss_bytes: int | None = None  # process resident set size
    # The decode roofline: bytes this step had to read (weights + the KV blocks in use, at their
    # real dtype) over the device's measured bandwidth, a lower bound on its time (decode-only
    # steps; engine/roofline.py).
    roofline_s: float | None = None


@dataclass(slots=True)
class TelemetrySample:
    """One reading of the device by the telemetry sampler (engine/telemetry.py), `t` seconds
    from run start like the steps, which join it by time. Empty fields were not available."""

    t: float
    rss_bytes: int | None = None
    cpu_pct: float | None = None  # of one core (psutil): up to 100 x cores
    gpu_memory_used_bytes: int | None = None  # NVML: the whole device, every process
    gpu_util_pct: float | None = None  # NVML: share of time a kernel ran
    memory_util_pct: float | None = None  # NVML: share of time memory was read or written
    power_w: float | None = None
    sm_clock_mhz: float | None = None
    temperature_c: float | None = None


@dataclass(slots=True)
class BlockEvent:
    """One state change of one KV block; `ref_count` is the value after the event.

    `group_id` is the KV cache group the block serves (engine/kv_cache): a block id addresses one
    group's layers at a time. Traces recorded before groups existed had one group, 0."""

    step: int
    block_id: int
    kind: BlockEventKind = field(metadata={"codes": BLOCK_EVENT_KINDS})
    request_id: int | None
    ref_count: int
    block_hash: str | None = None  # hex, set on "cache" (and on "touch"/"evict" of a hashed block)
    group_id: int = 0
    reason: str | None = None  # a "drop": the policy's reason (out of window, lowest mass, ...)


@dataclass(slots=True)
class RequestEvent:
    """A request's life-cycle transition, for the request timeline."""

    step: int
    t: float
    request_id: int
    kind: RequestEventKind = field(metadata={"codes": REQUEST_EVENT_KINDS})


@dataclass(slots=True)
class RequestRecord:
    """A finished (or rejected) request. Times are seconds from run start."""

    request_id: int
    arrival_t: float
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens served by the prefix cache at first schedule
    output_tokens: int
    first_token_t: float | None
    finish_t: float | None
    num_preemptions: int
    finish_reason: str  # "stop" | "length" | "rejected: <why>" | "aborted"
    label: str | None = None  # the workload file's own id for the request ("q0", a custom_id)


@dataclass(slots=True)
class Keyframe:
    """The full block state after `step`, one list entry per block id."""

    step: int
    ref_counts: list[int]
    block_hashes: list[str | None]  # hex of the block's hash while it is hashed
    owners: list[int | None]  # request that last allocated or touched the block, while in use
    free_queue: list[int]  # free block ids in eviction order (head first)
    # The group a block serves while in use or cached; None while free and unhashed. Left
    # empty by traces from before groups: then every used or hashed block is in group 0.
    groups: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.groups and self.ref_counts:
            self.groups = _single_group(self.ref_counts, self.block_hashes)


@dataclass(slots=True)
class BlockState:
    """A mutable block state that events are replayed onto (what Replay draws)."""

    ref_counts: list[int]
    block_hashes: list[str | None]
    owners: list[int | None]
    free_queue: list[int] = field(default_factory=list)
    groups: list[int | None] = field(default_factory=list)  # empty: derived as for Keyframe

    def __post_init__(self) -> None:
        if not self.groups and self.ref_counts:
            self.groups = _single_group(self.ref_counts, self.block_hashes)

    @classmethod
    def from_keyframe(cls, keyframe: Keyframe) -> BlockState:
        return cls(
            list(keyframe.ref_counts),
            list(keyframe.block_hashes),
            list(keyframe.owners),
            list(keyframe.free_queue),
            list(keyframe.groups),
        )

    def to_keyframe(self, step: int) -> Keyframe:
        return Keyframe(
            step, list(self.ref_counts), list(self.block_hashes), list(self.owners),
            list(self.free_queue), list(self.groups),
        )


def _single_group(ref_counts: list[int], block_hashes: list[str | None]) -> list[int | None]:
    """Block groups of a state recorded before groups existed: all in group 0 but free blocks
    without a hash, which no group holds."""
    return [0 if ref > 0 or h is not None else None
            for ref, h in zip(ref_counts, block_hashes, strict=True)]


def apply_block_event(state: BlockState, event: BlockEvent) -> None:
    """Replay one event: the free queue follows the block pool's rules (vLLM 0.33.0).

    allocate pops a free block (ref 0 -> 1); touch of a free cached block revives it (0 -> 1);
    free to ref 0 appends the block at the tail, free_head puts it at the head (the pool emits
    the free_heads of one release in reverse, so that inserting them one by one at the head
    rebuilds their order); a drop to 0 goes to the tail if the block is hashed, else to the
    head (emitted in the same order); evict drops the hash of a block being reused.
    """
    b = event.block_id
    was_free = state.ref_counts[b] == 0
    state.ref_counts[b] = event.ref_count
    if event.kind in ("allocate", "touch"):
        state.owners[b] = event.request_id
        state.groups[b] = event.group_id
        if was_free and event.ref_count > 0:
            state.free_queue.remove(b)
    elif event.kind in ("free", "free_head", "drop"):
        if event.ref_count == 0:
            state.owners[b] = None
            hashed = state.block_hashes[b] is not None
            if not hashed:
                state.groups[b] = None
            if event.kind == "free" or (event.kind == "drop" and hashed):
                state.free_queue.append(b)
            else:
                state.free_queue.insert(0, b)
    elif event.kind == "cache":
        state.block_hashes[b] = event.block_hash
        state.groups[b] = event.group_id
    elif event.kind == "evict":
        state.block_hashes[b] = None
        if state.ref_counts[b] == 0:
            state.groups[b] = None


class TraceSink(Protocol):
    """Where the engine sends its trace. `store.RunWriter` writes a database; tests keep lists."""

    def record_step(
        self,
        step: StepRecord,
        block_events: Sequence[BlockEvent],
        request_events: Sequence[RequestEvent],
    ) -> None: ...

    def record_request(self, request: RequestRecord) -> None: ...

    def record_keyframe(self, keyframe: Keyframe) -> None: ...

    def record_telemetry(self, sample: TelemetrySample) -> None: ...


@dataclass
class ListSink:
    """In-memory sink for tests and benchmarks."""

    steps: list[StepRecord] = field(default_factory=list)
    block_events: list[BlockEvent] = field(default_factory=list)
    request_events: list[RequestEvent] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    keyframes: list[Keyframe] = field(default_factory=list)
    telemetry: list[TelemetrySample] = field(default_factory=list)

    def record_step(self, step, block_events, request_events) -> None:
        self.steps.append(step)
        self.block_events.extend(block_events)
        self.request_events.extend(request_events)

    def record_request(self, request: RequestRecord) -> None:
        self.requests.append(request)

    def record_keyframe(self, keyframe: Keyframe) -> None:
        self.keyframes.append(keyframe)

    def record_telemetry(self, sample: TelemetrySample) -> None:
        self.telemetry.append(sample)
