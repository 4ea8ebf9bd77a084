"""The home page's demo shows what the lab is about: prefix sharing (ref counts above 1), LRU
eviction of cached free blocks, a preemption and its recompute, and prefix re-hits after
eviction. EOS is ignored, so the tiny model with the demo's settings makes exactly the steps
SmolLM2 makes; the `slow` test runs SmolLM2 itself and times it."""

from __future__ import annotations

import time

import pytest

from engine.run import run
from engine.trace import ListSink
from ui import analysis, session


def demo_trace(loaded, **changes) -> tuple[ListSink, object]:
    config = session.demo_config().replace(**changes)
    sink = ListSink()
    result = run(config, sink, model=loaded)
    return sink, result.summary


def test_the_demo_shows_sharing_eviction_preemption_and_re_hits(tiny_model):
    sink, summary = demo_trace(tiny_model, model="tiny", device="cpu")
    events = sink.block_events
    assert max(e.ref_count for e in events) > 1  # prefix sharing
    evicts = [e for e in events if e.kind == "evict"]
    assert evicts and all(e.block_hash for e in evicts)  # LRU eviction of cached free blocks
    preempts = [e for e in sink.request_events if e.kind == "preempt"]
    assert preempts and summary.num_preemptions >= 1
    victim, when = preempts[0].request_id, preempts[0].step
    back = [e for e in events if e.request_id == victim and e.step > when
            and e.kind in ("touch", "allocate")]
    assert any(e.kind == "touch" for e in back)  # its recompute re-hits its cached blocks
    first_evict = evicts[0].step
    assert any(e.kind == "touch" and e.step > first_evict for e in events)  # re-hits
    assert summary.num_finished == summary.num_requests == 8
    assert len(sink.steps) <= 60  # short: each SmolLM2 step costs up to a second or two here


def test_the_demo_replay_starts_at_its_first_preemption(tiny_model, store):
    from store import RunReader, RunWriter

    config = session.demo_config().replace(model="tiny", device="cpu")
    writer = RunWriter(store, config, name="demo", tags=[session.DEMO_TAG])
    writer.close(summary=run(config, writer, model=tiny_model).summary.to_dict())
    reader = RunReader(store)
    steps = reader.steps(writer.run_id)
    step, line = analysis.story(steps, reader.request_events(writer.run_id))
    assert step == int(steps.loc[steps["num_preempted"] > 0, "step"].iloc[0])
    assert "preempted" in line


@pytest.mark.slow
def test_the_demo_on_smollm2_takes_under_a_minute_or_so(smollm2):
    start = time.perf_counter()
    sink, summary = demo_trace(smollm2)
    elapsed = time.perf_counter() - start
    print(f"\nSmolLM2 demo: {elapsed:.1f} s, {summary.steps} steps, "
          f"{summary.num_preemptions} preemptions, {summary.num_evictions} evictions")
    assert summary.num_preemptions >= 1 and summary.num_evictions >= 1
    assert elapsed < 120, elapsed  # under a minute on an idle 2-core box; margin for noise
