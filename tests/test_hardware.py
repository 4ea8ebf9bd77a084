"""Where memory goes: the profile's parts add up to the process memory, a memory fraction
yields the blocks the formula predicts, telemetry rows cover a run's steps, the step loop
never calls NVML, and the Hardware page renders with and without telemetry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine import memory_profile
from engine.config import RunConfig, SamplingConfig, WorkloadSpec
from engine.run import run
from engine.trace import ListSink
from store import RunReader, RunWriter

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = WorkloadSpec(kind="synthetic", num_requests=4, prompt_len_min=20, prompt_len_max=40,
                        output_len_min=20, output_len_max=30)


def tiny(**knobs) -> RunConfig:
    return RunConfig(model="tiny", device="cpu", max_model_len=256, workload=WORKLOAD,
                     sampling=SamplingConfig(ignore_eos=True), **knobs)


def test_the_profile_parts_add_up_to_the_process_memory():
    """In a process of its own (a test process carries other tests' memory): `cli.py run
    --json` reports the parts, and they add up to the RSS measured after allocation."""
    out = subprocess.run(
        [sys.executable, "cli.py", "run", "--model", "tiny", "--workload", "mixed",
         "--num-blocks", "4096", "--max-model-len", "256", "--json"],  # a 32 MiB cache
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout.strip().splitlines()[-1])["memory_profile"]
    assert p["kv_cache_bytes"] >= 4096 * 4096  # the pool, zeroed so it is resident
    assert p["weights_bytes"] > 0 and p["activation_peak_bytes"] > 0
    parts = (p["weights_bytes"] + p["kv_cache_bytes"] + p["other_torch_bytes"]
             + p["non_torch_bytes"])
    assert abs(parts - p["measured_bytes"]) <= 0.05 * p["measured_bytes"], (parts, p)


def test_a_memory_fraction_yields_the_blocks_of_the_formula(tiny_model):
    result = run(tiny(kv_memory_fraction=0.2), ListSink(), model=tiny_model)
    p = result.summary.memory_profile
    page = result.summary.kv_page_size_bytes
    usable = (0.2 * p["device_memory_bytes"] - p["weights_bytes"]
              - p["activation_peak_bytes"] - p["non_torch_bytes"])
    assert result.summary.num_blocks == int(usable // page)
    assert "0.2 x" in p["kv_blocks_rule"] and f"{result.summary.num_blocks} blocks" in \
        p["kv_blocks_rule"]


def test_too_small_a_fraction_is_refused_with_the_numbers(tiny_model):
    with pytest.raises(memory_profile.KVBudgetError, match=r"0\.0001 x .* needs"):
        run(tiny(kv_memory_fraction=0.0001), ListSink(), model=tiny_model)


def test_telemetry_covers_the_steps_and_the_step_loop_never_calls_nvml(tiny_model,
                                                                        monkeypatch):
    from engine import telemetry

    calls = []
    monkeypatch.setattr(telemetry, "_read_nvml", lambda *a: calls.append(1))
    sink = ListSink()
    run(tiny(num_blocks=64, telemetry_hz=50), sink, model=tiny_model)
    assert not calls  # no GPU here: the sampler has no NVML handle, and steps never read it
    times = [s.t for s in sink.telemetry]
    assert len(times) >= 3 and times == sorted(times)
    first, last = sink.steps[0].t, sink.steps[-1].t
    assert times[0] <= first + 0.1 and times[-1] >= last - 0.1  # they span the steps
    assert all(s.rss_bytes for s in sink.telemetry)
    assert any(s.roofline_s for s in sink.steps) and all(
        s.roofline_s is None for s in sink.steps if s.num_prefill_tokens)


def seed(store, model, telemetry_hz: float) -> int:
    config = tiny(num_blocks=64, telemetry_hz=telemetry_hz)
    writer = RunWriter(store, config, name=f"telemetry {telemetry_hz}")
    writer.close(summary=run(config, writer, model=model).summary.to_dict())
    return writer.run_id


@pytest.mark.parametrize("telemetry_hz", [20.0, 0.0])
def test_the_hardware_page_renders_with_and_without_telemetry(store, tiny_model, telemetry_hz):
    run_id = seed(store, tiny_model, telemetry_hz)
    assert (len(RunReader(store).telemetry(run_id)) > 0) == (telemetry_hz > 0)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30)
    at.switch_page("pages/6_Hardware.py")
    at.query_params["run"] = str(run_id)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    titles = [json.loads(c.proto.spec).get("title", "") for c in at.get("vega_lite_chart")]
    assert any(str(t).startswith("memory at engine start") for t in titles)
    assert "decode step time vs its roofline bound" in titles
    assert any("no NVIDIA GPU" in i.value for i in at.info)
    no_telemetry = any("No telemetry in this run" in c.value for c in at.caption)
    assert no_telemetry == (telemetry_hz == 0)
