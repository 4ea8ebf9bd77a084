"""The hardware's own readings, beside the engine's steps.

- `MemoryProbe.read()` runs once per step and is cheap: torch's allocator figures on CUDA and
  the process RSS (one read of /proc/self/statm). It never calls NVML.
- `TelemetrySampler` is a thread that samples the device at a fixed rate (default 10 Hz) into
  `TelemetrySample`s with run-relative times; the trace keeps them in their own table and the
  pages join them to steps by time. On an NVIDIA GPU it reads NVML (memory used, GPU and
  memory-controller utilisation, power, SM clock, temperature); everywhere it reads psutil
  (RSS, CPU %). NVML's utilisation is the share of time a kernel ran, not SM occupancy, and
  its power is averaged over about a second.
Without an NVIDIA GPU the NVML fields stay empty and `gpu_note` says why, once.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.trace import TelemetrySample

DEFAULT_HZ = 10.0


@dataclass(slots=True)
class MemoryReading:
    torch_allocated_bytes: int | None = None
    torch_reserved_bytes: int | None = None
    rss_bytes: int | None = None


def read_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryProbe:
    """Reads memory once per step (no NVML: that is the sampler's job). `gpu_note` says, once,
    why a run has no NVML readings."""

    def __init__(self, device: torch.device):
        self.device = device
        self.nvml_handle, self.nvml_error = (_open_nvml(device.index or 0)
                                             if device.type == "cuda"
                                             else (None, f"the run's device is {device.type}"))

    @property
    def gpu_note(self) -> str | None:
        """'no NVIDIA GPU (why)' when the run has no NVML readings, else None."""
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
        return reading


class TelemetrySampler:
    """Samples the device every `1 / hz` seconds on its own thread until `stop()`. Samples
    carry seconds from `clock_start` (the run's monotonic start, as steps do)."""

    def __init__(self, device: torch.device, hz: float = DEFAULT_HZ,
                 nvml_handle: object | None = None) -> None:
        if hz <= 0:
            raise ValueError(f"telemetry rate must be > 0 Hz, got {hz}")
        self.interval = 1.0 / hz
        self.nvml_handle = nvml_handle
        self.samples: list[TelemetrySample] = []  # appended by the thread, read by anyone
        self.latest: TelemetrySample | None = None  # kept when samples are drained
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = _psutil_process()

    def start(self, clock_start: float) -> TelemetrySampler:
        if self._process is not None:
            self._process.cpu_percent(None)  # the first call only starts the interval
        self._thread = threading.Thread(target=self._loop, args=(clock_start,),
                                        name="kvlab-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[TelemetrySample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples

    def drain(self, into: Callable[[TelemetrySample], None]) -> int:
        """Hand the samples taken so far to `into`, oldest first; returns how many."""
        taken, self.samples = self.samples, []
        for sample in taken:
            into(sample)
        return len(taken)

    def _loop(self, clock_start: float) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.latest = self.sample(time.monotonic() - clock_start)
            self.samples.append(self.latest)
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def sample(self, t: float) -> TelemetrySample:
        sample = TelemetrySample(t=t)
        if self._process is not None:
            import psutil

            try:
                sample.rss_bytes = self._process.memory_info().rss
                sample.cpu_pct = self._process.cpu_percent(None)
            except psutil.Error:
                pass
        if self.nvml_handle is not None:
            _read_nvml(self.nvml_handle, sample)
        return sample


def _read_nvml(handle: object, sample: TelemetrySample) -> None:
    import pynvml

    readers = (
        ("gpu_memory_used_bytes", lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)),
        ("gpu_util_pct", lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
        ("memory_util_pct", lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).memory)),
        ("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        ("sm_clock_mhz", lambda: float(pynvml.nvmlDeviceGetClockInfo(
            handle, pynvml.NVML_CLOCK_SM))),
        ("temperature_c", lambda: float(pynvml.nvmlDeviceGetTemperature(
            handle, pynvml.NVML_TEMPERATURE_GPU))),
    )
    for name, read in readers:
        try:
            setattr(sample, name, read())
        except pynvml.NVMLError:
            pass  # a reading this driver does not offer stays empty


def _psutil_process():
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process()


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


def device_description(device: torch.device) -> dict[str, object]:
    """What the run ran on: GPU name, memory and driver, or CPU model, cores and memory."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out: dict[str, object] = {"kind": "cuda", "name": props.name,
                                  "memory_bytes": int(props.total_memory),
                                  "torch_cuda": torch.version.cuda}
        handle, _ = _open_nvml(device.index or 0)
        if handle is not None:
            import pynvml

            try:
                out["driver"] = pynvml.nvmlSystemGetDriverVersion()
            except pynvml.NVMLError:
                pass
        return out
    return {"kind": "cpu", "name": _cpu_model(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "memory_bytes": _total_memory()}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
