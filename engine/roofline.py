"""The decode roofline: how fast a decode step could possibly be on this device.

A decode step must read every weight once and every KV block in use (at its real dtype); at
the device's memory bandwidth that takes `bytes / bandwidth` seconds, a lower bound on the
step. The bandwidth is a large read (summing a 256 MiB tensor on a CPU, on huge pages as the
weights are; 4 GiB on a GPU, whose HBM reads 256 MiB in tens of microseconds, near a launch's
cost; best of five), measured once
per process and device; the best figure any process has measured is kept beside the other
derived files, so a reading taken while the machine was busy does not lower the bound.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from engine.cache_files import atomic_write, cache_dir
from engine.host_memory import empty_bytes
from engine.telemetry import device_description

PROBE_BYTES = {"cpu": 256 << 20, "cuda": 4 << 30}
_MEASURED: dict[str, float] = {}  # this process's figure per device key


def measure_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 5) -> float:
    """Bytes per second of a large read on `device` (best of `reps` sums)."""
    nbytes = nbytes or PROBE_BYTES.get(device.type, PROBE_BYTES["cpu"])
    if device.type == "cpu":  # on huge pages, as the weights are (engine/host_memory.py)
        x = empty_bytes(nbytes).view(torch.float32).fill_(1.0)
    else:
        x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del x
    return nbytes / best


def bandwidth(device: torch.device) -> float:
    """The device's read bandwidth: the best of this process's measurement and any earlier."""
    desc = device_description(device)
    key = f"{desc['kind']}|{desc['name']}|{desc.get('threads', '')}"
    if key not in _MEASURED:
        path = cache_dir() / "bandwidth.json"
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        measured = measure_bandwidth(device)
        if measured > known.get(key, 0.0):
            known[key] = measured
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(known)))
        _MEASURED[key] = known[key]
    return _MEASURED[key]


def decode_bound_s(weights_bytes: int, kv_bytes_in_use: int, bytes_per_s: float) -> float:
    """The least time a decode step that reads these bytes can take."""
    return (weights_bytes + kv_bytes_in_use) / bytes_per_s
