"""The store against the real engine: block_state_at equals the block pool's own state at
every step of a recorded run (tiny random model, a workload that forces prefix hits, frees,
evictions, preemptions and a window layer's drops)."""

from __future__ import annotations

from store_fixtures import fixture_db_url, fixture_make_db_url, fixture_trace_store  # noqa: F401

import engine.run as engine_run
from engine.config import RunConfig, SamplingConfig, WorkloadSpec
from engine.trace import BLOCK_EVENT_KINDS, Keyframe
from store import RunReader, RunWriter

CONFIG = RunConfig(
    model="tiny", num_blocks=32, block_size=16, policy="0:full; 1:window(4,32)",
    max_model_len=256, max_num_seqs=4,
    max_num_batched_tokens=128, keyframe_interval=7, seed=3,
    sampling=SamplingConfig(ignore_eos=True),
    workload=WorkloadSpec(kind="synthetic", num_requests=8, arrival_rate=0.0,
                          prompt_len_min=16, prompt_len_max=64, output_len_min=8,
                          output_len_max=24, num_prefix_groups=2, shared_prefix_len=48),
)


def test_block_state_at_equals_block_manager_every_step(trace_store, monkeypatch) -> None:
    engines = []

    class CapturingEngine(engine_run.LLMEngine):  # the run's engine, so the test can look inside
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(engine_run, "LLMEngine", CapturingEngine)
    truth: dict[int, Keyframe] = {}

    def on_step(record) -> None:
        truth[record.step] = engines[0].kv_cache_manager.snapshot(record.step)

    writer = RunWriter(trace_store, CONFIG, name="engine truth")
    result = engine_run.run(CONFIG, writer, on_step=on_step)
    writer.close(summary=result.summary)
    reader = RunReader(trace_store)
    assert reader.last_step(writer.run_id) == len(truth) == result.summary.steps
    kinds = set(reader.block_events(writer.run_id).kind)
    assert kinds == set(BLOCK_EVENT_KINDS), kinds  # the workload exercises every kind
    for step, expected in truth.items():
        assert reader.block_state_at(writer.run_id, step).to_keyframe(step) == expected, step
    assert reader.run_info(writer.run_id).summary == result.summary.to_dict()
