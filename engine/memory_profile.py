"""Where device memory goes, measured at engine start the way vLLM sizes its KV cache.

    weights            the parameters (and buffers) of the model, from their sizes
    activations        the peak of one forward pass at the scheduler's largest token budget,
                       run before the cache is sized (vLLM's `profile_run`)
    KV cache           the pool's pages (scales included) and, for quantized formats, the
                       full-precision residual, from their sizes
    other torch        torch memory that is none of those (CUDA: reserved - allocated; CPU:
                       the attention workspace and RoPE tables)
    non-torch          everything else the process holds: the interpreter, libraries, the
                       tokenizer (CUDA: NVML's used - torch's reserved; CPU: RSS - torch's)

With `kv_memory_fraction` F (vLLM's `gpu_memory_utilization`) the pool gets
    blocks = (F x device memory - weights - activation peak - non-torch) / page size.
On CPU the device memory is what the process may hold: its cgroup limit, else MemAvailable
plus what it already holds. On CPU the cache is zeroed at allocation so its pages are resident
and the parts add up to the process's RSS (pages of a never-written `torch.empty` would not be).
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.telemetry import read_rss_bytes


@dataclass(slots=True)
class MemoryProfile:
    device: str
    device_memory_bytes: int
    weights_bytes: int
    activation_peak_bytes: int
    kv_cache_bytes: int = 0
    other_torch_bytes: int = 0
    non_torch_bytes: int = 0
    measured_bytes: int = 0  # CPU: RSS after allocation; CUDA: NVML used (or torch reserved)
    kv_blocks_rule: str = ""  # how the block count was reached, for the summary

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def parts_bytes(self) -> int:
        """Resident parts (the activation peak is transient: freed after the forward)."""
        return (self.weights_bytes + self.kv_cache_bytes + self.other_torch_bytes
                + self.non_torch_bytes)


def weights_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}  # tied once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    limit = _cgroup_limit()
    if limit is not None:
        return limit
    return (_meminfo("MemAvailable") or 0) + (read_rss_bytes() or 0)


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return None


def _meminfo(key: str) -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class PeakMeter:
    """The peak memory one block of work added: CUDA from torch's allocator statistics; CPU
    from the kernel's peak RSS (VmHWM), which /proc/self/clear_refs resets."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0

    def __enter__(self) -> PeakMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _reset_peak_rss()
            self.start = read_rss_bytes() or 0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.start)
        return max(0, (_peak_rss() or 0) - self.start)


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _peak_rss() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def non_torch_bytes(device: torch.device, torch_bytes: int) -> int:
    """What the process holds outside torch: CUDA from NVML (the device's used memory minus
    torch's reserved); CPU the RSS minus the torch memory we know of."""
    if device.type == "cuda":
        from engine.telemetry import _open_nvml

        handle, _ = _open_nvml(device.index or 0)
        if handle is None:
            return 0
        import pynvml

        used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        return max(0, used - torch.cuda.memory_reserved(device))
    return max(0, (read_rss_bytes() or 0) - torch_bytes)


def fraction_blocks(fraction: float, profile: MemoryProfile, page_size: int) -> tuple[int, str]:
    """vLLM's rule: (F x device memory - weights - activation peak - non-torch) / page size."""
    usable = (fraction * profile.device_memory_bytes - profile.weights_bytes
              - profile.activation_peak_bytes - profile.non_torch_bytes)
    blocks = max(0, int(usable // page_size))
    rule = (f"{fraction:g} x {_gib(profile.device_memory_bytes)} device memory - "
            f"{_gib(profile.weights_bytes)} weights - {_gib(profile.activation_peak_bytes)} "
            f"activation peak - {_gib(profile.non_torch_bytes)} non-torch = {_gib(usable)}, "
            f"/ {page_size:,} bytes per block = {blocks} blocks")
    return blocks, rule


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class KVBudgetError(ValueError):
    """The memory left for the KV cache cannot hold one request; the message has the numbers."""


# Activation peaks measured in this process, per model: a second engine on the same loaded
# model (every run of the dashboard or a sweep worker) reuses the figure instead of paying
# another full-budget forward pass (~2 s for SmolLM2 at 1,024 tokens on 2 cores). It is also
# the truer figure: on CPU a second pass reuses memory the first freed, so its RSS peak is low.
_ACTIVATION_PEAKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def profile_activations(loaded, groups, num_tokens: int) -> int:
    """Peak memory of one forward pass over `num_tokens` prompt tokens (a throwaway cache just
    big enough), minus the K/V it wrote: what activations need at the largest token budget.
    Measured once per (model, token count, cache layout) in a process."""
    key = (num_tokens, str(loaded.device), tuple(groups))
    known = _ACTIVATION_PEAKS.setdefault(loaded.model, {})
    if key not in known:
        known[key] = _measure_activations(loaded, groups, num_tokens)
    return known[key]


def _measure_activations(loaded, groups, num_tokens: int) -> int:
    from engine.kv_cache.storage import PagedKVCache
    from engine.model_runner import ModelRunner
    from engine.sequence import Sequence

    bs = groups[0].spec.block_size
    per_group = -(-num_tokens // bs)
    cache = PagedKVCache(groups, per_group * len(groups), loaded.device,
                         residual_slots=per_group + 2)
    runner = ModelRunner(loaded, cache)
    tables = tuple(list(range(g * per_group, (g + 1) * per_group)) for g in range(len(groups)))
    seq = Sequence(0, [i % loaded.config.vocab_size for i in range(num_tokens)], num_tokens,
                   max_tokens=1, block_tables=tables)
    with PeakMeter(loaded.device) as meter:
        runner.execute([(seq, num_tokens)])
    written = num_tokens * sum(g.bytes_per_token for g in groups)
    del runner, cache
    return max(0, int(meter.peak_bytes - written))


def start_profile(config, loaded, groups) -> MemoryProfile:
    """Everything but the cache, measured before it is sized (vLLM's order): weights,
    non-torch memory, and the activation peak of one forward at the largest token budget."""
    device = loaded.device
    weights = weights_bytes(loaded.model)
    tokens = max(1, min(config.max_num_batched_tokens, config.resolved_max_model_len - 1))
    activations = profile_activations(loaded, groups, tokens)
    return MemoryProfile(device=str(device), device_memory_bytes=device_memory_bytes(device),
                         weights_bytes=weights, activation_peak_bytes=activations,
                         non_torch_bytes=non_torch_bytes(device, weights))


def choose_blocks(config, profile: MemoryProfile, groups, needed: int) -> int:
    """The pool's block count from the config (a count, a byte budget or a memory fraction),
    with the rule that produced it written into the profile."""
    page = groups[0].page_size_bytes
    if config.kv_memory_fraction is None:
        blocks = config.num_blocks_for(page)
        profile.kv_blocks_rule = (
            f"{blocks} blocks as given" if config.num_blocks is not None else
            f"{config.kv_budget_bytes:,} bytes / {page:,} bytes per block = {blocks} blocks"
            if config.kv_budget_bytes is not None else f"the default, {blocks} blocks")
        return blocks
    blocks, profile.kv_blocks_rule = fraction_blocks(config.kv_memory_fraction, profile, page)
    if blocks < needed:
        raise KVBudgetError(
            f"kv_memory_fraction: {profile.kv_blocks_rule}, but one full-length request needs "
            f"{needed}; raise the fraction or lower max_model_len")
    return blocks


def finish_profile(profile: MemoryProfile, kv_cache) -> None:
    """The cache's bytes and what the device holds now it is allocated."""
    device = torch.device(profile.device)
    profile.kv_cache_bytes = kv_cache.allocated_bytes + kv_cache.residual_bytes
    if device.type == "cuda":
        reserved = torch.cuda.memory_reserved(device)
        profile.other_torch_bytes = max(0, reserved - torch.cuda.memory_allocated(device))
        profile.measured_bytes = reserved + profile.non_torch_bytes
    else:
        profile.measured_bytes = read_rss_bytes() or 0
