"""Synthetic traces for the Replay tests: long runs, big pools and many requests, written through
the store's RunWriter without the engine (seconds, not minutes). Each keeps a true BlockState
with engine.trace.apply_block_event, so its keyframes agree with its events."""

from __future__ import annotations

import random

from engine.config import RunConfig, WorkloadSpec
from engine.trace import (
    BlockEvent,
    BlockState,
    RequestEvent,
    RequestRecord,
    StepRecord,
    apply_block_event,
)
from store import RunWriter


def _record(state: BlockState, step: int, t: float, events: list[BlockEvent],
            running: int, waiting: int) -> StepRecord:
    n = len(state.ref_counts)
    used = n - len(state.free_queue)
    cached = sum(state.block_hashes[b] is not None for b in state.free_queue[:100_000])
    hits = sum(e.kind == "touch" for e in events)
    return StepRecord(step, t, 0.01, running, waiting, 0, running, running,
                      0, used, n - used, cached, 8 * hits + 8, 8 * hits,
                      sum(e.kind == "evict" for e in events), used * 1024, n * 1024)


def synthetic_run(store, num_steps: int, num_blocks: int, *, name: str = "synthetic",
                  keyframe_interval: int = 50) -> tuple[int, int]:
    """A long trace: requests take a free block from the queue's head, some blocks get
    hashed, used blocks are freed to the tail. Returns (run id, last step)."""
    rng = random.Random(0)
    config = RunConfig(model="tiny", device="cpu", num_blocks=num_blocks, max_model_len=256,
                       keyframe_interval=keyframe_interval)
    writer = RunWriter(store, config, name=name)
    state = BlockState([0] * num_blocks, [None] * num_blocks, [None] * num_blocks,
                       list(range(num_blocks)))
    writer.record_keyframe(state.to_keyframe(0))
    used: list[int] = []
    for step in range(1, num_steps + 1):
        rid, t = step % 32, step * 0.01
        events, request_events = [], [RequestEvent(step, t, rid, "schedule")]
        if state.free_queue and rng.random() < 0.55:
            b = state.free_queue[0]
            if state.block_hashes[b] is not None:
                events.append(BlockEvent(step, b, "evict", rid, 0, state.block_hashes[b]))
            events.append(BlockEvent(step, b, "allocate", rid, 1))
            used.append(b)
            if rng.random() < 0.5:
                events.append(BlockEvent(step, b, "cache", rid, 1, f"{step:016x}"))
        elif used:
            b = used.pop(rng.randrange(len(used)))
            events.append(BlockEvent(step, b, "free", state.owners[b], 0))
        for event in events:
            apply_block_event(state, event)
        writer.record_step(_record(state, step, t, events, 4, 1), events, request_events)
        if step % keyframe_interval == 0:
            writer.record_keyframe(state.to_keyframe(step))
    for rid in range(32):
        writer.record_request(RequestRecord(rid, 0.0, 16, 0, 8, 0.1, 1.0, 0, "length"))
    writer.close(summary={"steps": num_steps, "num_blocks": num_blocks})
    return writer.run_id, num_steps


def many_requests_run(store, num_requests: int, *, per_step: int = 8, blocks_each: int = 2,
                      num_blocks: int = 1024, rejected_every: int = 500) -> tuple[int, int]:
    """`num_requests` short requests, `per_step` admitted a step, each holding `blocks_each`
    blocks for two steps (its first shares a prefix block with every request); every
    `rejected_every`-th is rejected. Returns (run id, last step)."""
    config = RunConfig(model="tiny", device="cpu", num_blocks=num_blocks, max_model_len=256,
                       keyframe_interval=50,
                       workload=WorkloadSpec(kind="synthetic", num_requests=num_requests))
    writer = RunWriter(store, config, name=f"{num_requests} requests")
    state = BlockState([0] * num_blocks, [None] * num_blocks, [None] * num_blocks,
                       list(range(num_blocks)))
    writer.record_keyframe(state.to_keyframe(0))
    prefix = state.free_queue[0]
    live: dict[int, list[int]] = {}
    next_id, step = 0, 0
    while next_id < num_requests or live:
        step += 1
        t = step * 0.02
        events, request_events = [], []
        done_before = next_id - per_step if next_id < num_requests else num_requests
        for rid in [r for r in live if r < done_before]:  # done a step after the next batch
            for b in reversed(live.pop(rid)):
                events.append(BlockEvent(step, b, "free", rid, state.ref_counts[b] - 1))
                apply_block_event(state, events[-1])
            request_events.append(RequestEvent(step, t, rid, "finish"))
            writer.record_request(RequestRecord(rid, t - 0.04, 40, 16, 4, t - 0.02, t, 0,
                                                "length"))
        for rid in range(next_id, min(num_requests, next_id + per_step)):
            request_events.append(RequestEvent(step, t, rid, "arrive"))
            if rejected_every and rid % rejected_every == rejected_every - 1:
                writer.record_request(RequestRecord(rid, t, 9000, 0, 0, None, t, 0,
                                                    "rejected: longer than max_model_len"))
                continue
            request_events.append(RequestEvent(step, t, rid, "schedule"))
            blocks = _admit(state, step, rid, prefix, blocks_each, events)
            live[rid] = blocks
        next_id = min(num_requests, next_id + per_step)
        writer.record_step(_record(state, step, t, events, len(live), 0), events,
                           request_events)
        if step % 50 == 0:
            writer.record_keyframe(state.to_keyframe(step))
    writer.close(summary={"steps": step, "num_blocks": num_blocks})
    return writer.run_id, step


def _admit(state: BlockState, step: int, rid: int, prefix: int, count: int,
           events: list[BlockEvent]) -> list[int]:
    blocks = []
    if state.block_hashes[prefix] is not None:
        events.append(BlockEvent(step, prefix, "touch", rid, state.ref_counts[prefix] + 1,
                                 state.block_hashes[prefix]))
        apply_block_event(state, events[-1])
        blocks.append(prefix)
    while len(blocks) < count:
        b = state.free_queue[0]
        if state.block_hashes[b] is not None:
            events.append(BlockEvent(step, b, "evict", rid, 0, state.block_hashes[b]))
            apply_block_event(state, events[-1])
        events.append(BlockEvent(step, b, "allocate", rid, 1))
        apply_block_event(state, events[-1])
        if b == prefix:  # the first request computes the shared prefix block
            events.append(BlockEvent(step, b, "cache", rid, 1, "00000000000000aa"))
            apply_block_event(state, events[-1])
        blocks.append(b)
    return blocks
