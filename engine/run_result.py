"""What a finished run returns to its caller (CLI, dashboard, benchmarks)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class RunSummary:
    """Headline figures of one run; the store keeps these on the run row."""

    num_requests: int
    num_finished: int
    num_rejected: int
    prompt_tokens: int
    output_tokens: int
    steps: int
    elapsed_s: float
    output_tokens_per_s: float
    prefix_hit_rate: float  # prefix-cache hit tokens / looked-up prompt tokens
    num_preemptions: int
    num_evictions: int
    peak_blocks_used: int
    num_blocks: int
    kv_bytes_per_token: float  # every layer and head, scales included (an int for float caches)
    device: str
    dtype: str
    kv_dtype: str
    stopped: bool = False  # ended early by should_stop()
    kv_page_size_bytes: int = 0  # what one pool block costs
    # measured: the allocated storage tensors' bytes over the token slots they hold
    kv_allocated_bytes_per_token: float = 0.0
    kv_groups: list[dict[str, Any]] = field(default_factory=list)  # KVCacheGroup.to_dict()
    memory_profile: dict[str, Any] = field(default_factory=dict)  # engine.memory_profile
    device_info: dict[str, Any] = field(default_factory=dict)  # telemetry.device_description
    bandwidth_bytes_per_s: float | None = None  # measured read bandwidth (engine.roofline)
    gpu_note: str | None = None  # why the steps carry no NVML readings (telemetry.MemoryProbe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class RunResult:
    summary: RunSummary
    output_token_ids: dict[int, list[int]] = field(default_factory=dict)  # by request id
    output_text: dict[int, str] = field(default_factory=dict)
