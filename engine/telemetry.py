"""Device-memory readings for each StepRecord: torch's allocator on CUDA, NVML where an NVIDIA
driver answers, and the process RSS (the honest number on a CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class MemoryReading:
    torch_allocated_bytes: int | None = None
    torch_reserved_bytes: int | None = None
    nvml_used_bytes: int | None = None
    gpu_utilization_pct: float | None = None
    gpu_power_w: float | None = None
    rss_bytes: int | None = None


def read_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryProbe:
    """Reads memory once per step. NVML is opened once; without a GPU it reports nothing, and
    `gpu_note` says why in one line (for the run summary, not per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.nvml_handle = None
        self.nvml_error: str | None = None  # why there are no NVML readings
        if device.type == "cuda":
            self.nvml_handle, self.nvml_error = _open_nvml(device.index or 0)
        else:
            self.nvml_error = f"the run's device is {device.type}"

    @property
    def gpu_note(self) -> str | None:
        """'no NVIDIA GPU (why)' when the steps carry no NVML readings, else None."""
        if self.nvml_handle is not None:
            return None
        if self.device.type == "cuda":  # a GPU, but NVML cannot read it: torch's figures only
            return f"no NVIDIA GPU readings ({self.nvml_error}); memory from torch's allocator only"
        return f"no NVIDIA GPU ({self.nvml_error}); memory is the process RSS"

    def read(self) -> MemoryReading:
        reading = MemoryReading(rss_bytes=read_rss_bytes())
        if self.device.type == "cuda":
            reading.torch_allocated_bytes = torch.cuda.memory_allocated(self.device)
            reading.torch_reserved_bytes = torch.cuda.memory_reserved(self.device)
        if self.nvml_handle is not None:
            import pynvml

            try:
                reading.nvml_used_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(self.nvml_handle).used)
                util = pynvml.nvmlDeviceGetUtilizationRates(self.nvml_handle)
                reading.gpu_utilization_pct = float(util.gpu)
                reading.gpu_power_w = pynvml.nvmlDeviceGetPowerUsage(self.nvml_handle) / 1000.0
            except pynvml.NVMLError:
                pass  # a reading the driver does not support stays None
        return reading


def _open_nvml(index: int):
    """(handle, None) or (None, why). nvidia-ml-py raises NVMLError where there is no driver."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index), None
    except pynvml.NVMLError as exc:
        return None, f"NVML: {exc}"
