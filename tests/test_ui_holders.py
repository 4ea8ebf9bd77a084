"""ui.holders: the block tables rebuilt from block events equal the engine's own, step by step,
with prefix hits, preemption, sliding-window hits (null slots) and retention drops."""

from __future__ import annotations

import random

import pytest

import engine.run as engine_run
from engine.config import RunConfig, SamplingConfig, WorkloadSpec
from engine.llm_engine import LLMEngine
from engine.trace import ListSink
from ui import holders as H


class TableSink(ListSink):
    """A ListSink that also keeps the engine's block tables after every step."""

    def __init__(self, engines: list[LLMEngine]) -> None:
        super().__init__()
        self.engines, self.tables = engines, {}

    def record_step(self, step, block_events, request_events) -> None:
        super().record_step(step, block_events, request_events)
        manager = self.engines[-1].kv_cache_manager
        null = manager.null_block
        self.tables[step.step] = {
            (r, g): [H.NULL if b == null else b for b in table]
            for g, m in enumerate(manager.managers) for r, table in m.tables().items() if table}


def traced_run(monkeypatch, tiny_model, **knobs) -> TableSink:
    engines: list[LLMEngine] = []

    class Spy(LLMEngine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(engine_run, "LLMEngine", Spy)
    config = RunConfig(**{
        "model": "tiny", "device": "cpu", "block_size": 8, "num_blocks": 40,
        "max_model_len": 256, "max_num_seqs": 6, "keyframe_interval": 5,
        "sampling": SamplingConfig(ignore_eos=True),
        "workload": WorkloadSpec(kind="synthetic", num_requests=10, prompt_len_min=8,
                                 prompt_len_max=40, output_len_min=8, output_len_max=40,
                                 num_prefix_groups=2, shared_prefix_len=48),
        **knobs})
    sink = TableSink(engines)
    engine_run.run(config, sink, model=tiny_model)
    return sink


def events_of(sink: ListSink) -> list[H.Event]:
    return [H.Event(e.step, e.block_id, e.kind, e.request_id, e.block_hash, e.group_id)
            for e in sink.block_events]


def assert_tables_match(sink: TableSink) -> H.Holders:
    holders, events, i = H.Holders(), events_of(sink), 0
    for step in sorted(sink.tables):
        while i < len(events) and events[i].step <= step:
            holders.apply(events[i])
            i += 1
        assert holders.blocks == sink.tables[step], f"step {step}"
    return holders


@pytest.mark.parametrize("knobs", [
    {},  # full attention: prefix hits and, in 40 blocks, preemptions
    # a window group's hits leave null slots
    {"policy": "0:full; 1:window(4,16)", "max_model_len": 128, "num_blocks": 48},
    {"policy": "h2o(8,16)", "enable_prefix_caching": False},  # drops mid-request
], ids=["full", "hybrid-window", "h2o"])
def test_replayed_tables_equal_the_engines_at_every_step(monkeypatch, tiny_model, knobs):
    sink = traced_run(monkeypatch, tiny_model, **knobs)
    kinds = {e.kind for e in sink.block_events}
    holders = assert_tables_match(sink)
    if not knobs:
        assert "touch" in kinds and sum(s.num_preempted for s in sink.steps) > 0
        shared = [b for b, hs in holders.by_block().items() if len(hs) > 1]
        assert shared or max(e.ref_count for e in sink.block_events) > 1
    if "window" in knobs.get("policy", ""):
        assert any(H.NULL in t for step in sink.tables.values() for t in step.values())
        assert "touch" in kinds
    if "h2o" in knobs.get("policy", ""):
        assert "drop" in kinds


def test_parents_and_depths_follow_the_chain(monkeypatch, tiny_model):
    sink = traced_run(monkeypatch, tiny_model)
    holders = H.Holders()
    for event in events_of(sink):
        holders.apply(event)
        if event.kind == "cache":
            h = event.block_hash
            index = holders.depth[h]
            parent = holders.parent[h]
            assert (parent == H.ROOT) == (index == 0)
            if parent not in (H.ROOT, None):
                assert holders.depth[parent] == index - 1


def test_the_index_replays_any_step_from_its_checkpoints(monkeypatch, tiny_model):
    sink = traced_run(monkeypatch, tiny_model)
    events = events_of(sink)
    monkeypatch.setattr(H, "MIN_CHECKPOINT_EVENTS", 16)
    fetched = []

    def fetch(after: int, upto: int) -> list[H.Event]:
        fetched.append((after, upto))
        return [e for e in events if after < e.step <= upto]

    index = H.HolderIndex(fetch)
    last = max(sink.tables)
    assert index.at(last).blocks == sink.tables[last]
    assert len(index.checkpoints) > 2  # taken on the way
    for step in random.Random(0).sample(sorted(sink.tables), 12):
        assert index.at(step).blocks == sink.tables[step], step
    # a later call starts from the nearest checkpoint, not from the run's start
    assert all(after > 0 for after, _ in fetched[-5:] if after <= _) or len(fetched) > 1
    holders = index.at(last)
    holders.blocks.clear()  # a caller's copy: the checkpoints stay whole
    assert index.at(last).blocks == sink.tables[last]
