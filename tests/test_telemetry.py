"""Why a run has no GPU readings: said once, in the run's summary, never per step. NVML's
failure paths are forced with a stand-in `pynvml` module (this machine may well have a GPU)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from engine.config import RunConfig, WorkloadSpec
from engine.run import run
from engine.telemetry import MemoryProbe
from engine.trace import ListSink


def fake_pynvml(init_error: str | None) -> types.ModuleType:
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init() -> None:
        if init_error is not None:
            raise NVMLError(init_error)

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlDeviceGetHandleByIndex = lambda index: f"handle {index}"
    return module


def test_cpu_device_says_no_nvidia_gpu_and_reads_rss():
    probe = MemoryProbe(torch.device("cpu"))
    assert probe.gpu_note == ("no NVIDIA GPU (the run's device is cpu); memory is the "
                              "process RSS")
    reading = probe.read()
    assert reading.rss_bytes and reading.torch_allocated_bytes is None


def test_nvml_failure_on_a_cuda_device_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml("Driver Not Loaded"))
    probe = MemoryProbe(torch.device("cuda", 0))
    assert probe.nvml_handle is None
    assert probe.gpu_note == ("no NVIDIA GPU readings (NVML: Driver Not Loaded); memory from "
                              "torch's allocator only")


def test_missing_nvml_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    probe = MemoryProbe(torch.device("cuda", 0))
    assert "nvidia-ml-py is not installed" in probe.gpu_note


def test_working_nvml_leaves_no_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(None))
    probe = MemoryProbe(torch.device("cuda", 1))
    assert probe.nvml_handle == "handle 1" and probe.gpu_note is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run's summary")
def test_a_cpu_run_carries_the_note_in_its_summary_only(tiny_model):
    config = RunConfig(model="tiny", device="cpu", num_blocks=32, max_model_len=128,
                       workload=WorkloadSpec(kind="synthetic", num_requests=2,
                                             prompt_len_min=8, prompt_len_max=16,
                                             output_len_min=2, output_len_max=4))
    sink = ListSink()
    summary = run(config, sink, model=tiny_model).summary
    assert summary.gpu_note.startswith("no NVIDIA GPU (the run's device is cpu)")
    assert summary.to_dict()["gpu_note"] == summary.gpu_note
    assert sink.steps and all(s.nvml_used_bytes is None for s in sink.steps)
