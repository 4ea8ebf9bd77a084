"""RunConfig: every knob of a run, validated on construction, JSON round-trippable.

Validation errors are `ConfigError`s whose message names the bad field, the problem and the fix,
so the CLI can print it as one line and the dashboard can show it next to the widget.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.kv_cache.layout import PolicyError, make_groups, parse_policy
from engine.kv_cache.retention import max_blocks_per_request, parse_retention
from engine.kv_cache.spec import KV_FORMATS, QUANTIZED_BITS, KVCacheGroup
from engine.models.config import MODEL_CONFIGS, ModelConfig
from engine.models.hf_config import ModelFolderError, looks_like_path, read_folder_config

DEVICES = ("auto", "cpu", "cuda")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (its flags, read once, not assumed)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
DTYPES = ("auto", "fp32", "bf16", "fp16")
KV_DTYPES = ("auto", *KV_FORMATS)  # "auto": the model's dtype; see engine/kv_cache/spec.py
WORKLOAD_KINDS = ("synthetic", "file", "preset")
MLA_PATHS = ("auto", "absorbed", "expanded")  # see engine/attention/mla.py


class ConfigError(ValueError):
    """A setting that cannot work; `field` names the offending knob."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def parse_bytes(text: str | int) -> int:
    """'64MiB', '1.5GiB', '500MB', '1024' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError("kv_budget", f"cannot read {text!r} as a size; write e.g. 64MiB or 1GiB")
    number, unit = float(m.group(1)), (m.group(2) or "").upper()
    scale = {"": 1, "B": 1, "K": 1024, "KB": 1000, "KIB": 1024, "M": 1024**2, "MB": 1000**2,
             "MIB": 1024**2, "G": 1024**3, "GB": 1000**3, "GIB": 1024**3, "T": 1024**4,
             "TB": 1000**4, "TIB": 1024**4}
    return int(number * scale[unit])


@dataclass(slots=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError("top_k", "must be >= 0 (0 disables top-k)")


@dataclass(slots=True)
class WorkloadSpec:
    """Which requests a run serves: a named preset, a workload file, or synthetic settings."""

    kind: str = "preset"
    name: str = "shared-prefix"  # preset name (engine.workload.PRESETS)
    path: str | None = None  # workload file for kind == "file" (engine/workload_formats.py)
    num_requests: int = 16
    arrival_rate: float = 0.0  # requests per second, Poisson; 0 = all arrive at t=0
    prompt_len_min: int = 16
    prompt_len_max: int = 128
    output_len_min: int = 16
    output_len_max: int = 64
    num_prefix_groups: int = 0  # groups of requests sharing a system prompt
    shared_prefix_len: int = 256  # tokens of that shared system prompt
    num_turns: int = 1  # > 1: multi-turn chats that resend earlier turns

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ConfigError("workload.kind", f"{self.kind!r} is not one of {WORKLOAD_KINDS}")
        if self.kind == "file" and not self.path:
            raise ConfigError("workload.path", "a file workload needs the path of a workload file")
        for name in ("num_requests", "prompt_len_min", "output_len_min", "num_turns"):
            if getattr(self, name) < 1:
                raise ConfigError(f"workload.{name}", "must be at least 1")
        if self.prompt_len_max < self.prompt_len_min:
            raise ConfigError("workload.prompt_len_max", "must be >= prompt_len_min")
        if self.output_len_max < self.output_len_min:
            raise ConfigError("workload.output_len_max", "must be >= output_len_min")
        if self.arrival_rate < 0:
            raise ConfigError("workload.arrival_rate", "must be >= 0 (0: all arrive at once)")
        if self.num_prefix_groups < 0 or self.shared_prefix_len < 0:
            raise ConfigError("workload.num_prefix_groups", "prefix settings must be >= 0")


@dataclass(slots=True)
class RunConfig:
    """Every knob of one run. Construct it and it is valid, or a ConfigError says why not."""

    # a key of engine.models.config.MODEL_CONFIGS, or a Hugging Face model folder (made
    # absolute here, so workers in another directory find it)
    model: str = "smollm2"
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bf16 on CUDA and on CPUs with bf16 instructions, else fp32
    kv_dtype: str = "auto"  # auto: same as dtype; fp8, int8, int4 store full blocks quantized
    kv_rotate: bool = False  # Hadamard-rotate keys and queries before quantizing (not fp32..)
    block_size: int = 16  # tokens per KV block
    # what each layer (and KV head range) keeps: "full", or e.g. "0-14:full; 15-29:full",
    # which also splits the cache into groups (engine/kv_cache/layout.py)
    policy: str = "full"
    num_blocks: int | None = None  # KV blocks; give this or kv_budget_bytes (neither: 1024)
    kv_budget_bytes: int | None = None  # a byte budget for the KV cache, turned into blocks
    # vLLM's gpu_memory_utilization: the share of device memory (CPU: what the process may
    # hold) for everything; the cache gets what weights, activations and the rest leave
    kv_memory_fraction: float | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 8  # requests running at once
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's context length
    keyframe_interval: int = 50  # steps between full block-state snapshots in the trace
    telemetry_hz: float = 10.0  # device samples per second in the trace (0: none)
    # MLA models: how attention reads the latent cache (auto: absorbed decode, prefill chunks
    # by cost; see engine/attention/mla.py); ignored by models with a K/V cache
    mla_path: str = "auto"
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if isinstance(self.workload, dict):
            self.workload = WorkloadSpec(**self.workload)
        self._check_model()
        for name, allowed in (("device", DEVICES), ("dtype", DTYPES), ("kv_dtype", KV_DTYPES),
                              ("mla_path", MLA_PATHS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"{getattr(self, name)!r} is not one of {allowed}")
        bs = self.block_size
        if bs < 1 or bs & (bs - 1):
            raise ConfigError("block_size", f"{bs} is not a power of two; use e.g. 16 or 32")
        budgets = [n for n in ("num_blocks", "kv_budget_bytes", "kv_memory_fraction")
                   if getattr(self, n) is not None]
        if len(budgets) > 1:
            raise ConfigError(budgets[1], "give one of num_blocks, kv_budget_bytes and "
                              f"kv_memory_fraction, not {' and '.join(budgets)}")
        if self.kv_memory_fraction is not None and not 0 < self.kv_memory_fraction <= 1:
            raise ConfigError("kv_memory_fraction", "must be in (0, 1], e.g. 0.9")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs", "must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError("max_num_batched_tokens",
                              f"must be >= max_num_seqs ({self.max_num_seqs}) so every running "
                              "request can decode in one step")
        if self.keyframe_interval < 1:
            raise ConfigError("keyframe_interval", "must be at least 1")
        if not 0 <= self.telemetry_hz <= 1000:
            raise ConfigError("telemetry_hz", "must be in 0..1000 samples per second (0: off)")
        context = self.model_config.max_position_embeddings
        if self.max_model_len is not None and not 1 <= self.max_model_len <= context:
            raise ConfigError("max_model_len", f"must be in 1..{context} (the model's context)")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError("num_blocks", "must be at least 1")
        if self.kv_rotate and self.kv_dtype not in QUANTIZED_BITS:
            raise ConfigError("kv_rotate", "a Hadamard rotation only changes a quantized cache; "
                              "choose kv_dtype fp8, int8 or int4, or turn it off")
        try:
            groups = self.kv_groups()
        except PolicyError as exc:
            raise ConfigError("policy", str(exc).removeprefix("policy: ")) from exc
        except ValueError as exc:  # a format this model's shapes cannot take
            raise ConfigError("kv_dtype", str(exc)) from exc
        needed = self.blocks_needed(groups)
        have = self.resolved_num_blocks
        if have is not None and have < needed:
            source = ("num_blocks" if self.kv_budget_bytes is None else "kv_budget_bytes")
            per_group = ("" if len(groups) == 1 else f" over its {len(groups)} groups")
            raise ConfigError(
                source,
                f"the KV cache has {have} blocks of {bs} tokens but one full-length request "
                f"({self.resolved_max_model_len} tokens) needs {needed}{per_group}; raise the "
                f"budget to at least {needed * self.kv_bytes_per_block} bytes ({needed} blocks) "
                "or lower max_model_len",
            )

    def _check_model(self) -> None:
        """A preset name, or a readable model folder (stored as an absolute path)."""
        if looks_like_path(self.model):
            try:
                read_folder_config(self.model)
            except ModelFolderError as exc:
                raise ConfigError("model", str(exc)) from exc
            self.model = str(Path(self.model).expanduser().resolve())
        elif self.model not in MODEL_CONFIGS:
            raise ConfigError("model", f"unknown model {self.model!r}; choose one of "
                              f"{sorted(MODEL_CONFIGS)} or give a model folder path "
                              "(config.json and *.safetensors)")

    # Derived values -------------------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        if self.model in MODEL_CONFIGS:
            return MODEL_CONFIGS[self.model]
        return read_folder_config(self.model)

    @property
    def resolved_max_model_len(self) -> int:
        return self.max_model_len or self.model_config.max_position_embeddings

    def resolved_kv_dtype(self, device_type: str, model_dtype: str | None = None) -> str:
        """The cache format once the device is known: 'auto' is what the model computes in
        (`model_dtype`, when a loaded model is at hand), else the config's resolved dtype."""
        if self.kv_dtype != "auto":
            return self.kv_dtype
        return model_dtype or self.resolved_dtype(device_type)

    def resolved_dtype(self, device_type: str) -> str:
        """'auto': bf16 on CUDA, and on a CPU with bf16 instructions (AVX512-BF16 or AMX),
        where bf16 matmuls run at up to twice fp32's speed for half the bytes; fp32 on other
        CPUs, where bf16 is emulated and slower."""
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if device_type == "cuda" or cpu_has_bf16() else "fp32"

    def kv_groups(self, kv_dtype: str | None = None) -> tuple[KVCacheGroup, ...]:
        """The cache's groups for this model, policy and block size. Before the device is known
        an "auto" cache dtype is sized as fp32 (the CPU default); the engine passes the real
        one when it builds the cache."""
        kv = kv_dtype or (self.kv_dtype if self.kv_dtype != "auto" else (
            self.dtype if self.dtype != "auto" else "fp32"))
        model = self.model_config
        regions = parse_policy(self.policy, model.num_layers, model.num_kv_heads)
        return make_groups(regions, lambda heads: model.kv_cache_spec(self.block_size, kv, heads,
                                                                      self.kv_rotate))

    @property
    def kv_bytes_per_block(self) -> int:
        """What one pool block costs (see `kv_groups`)."""
        return self.kv_groups()[0].page_size_bytes

    def num_blocks_for(self, page_size_bytes: int) -> int:
        """Pool blocks: as given, or what the byte budget buys at this page size."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_budget_bytes is not None:
            return self.kv_budget_bytes // page_size_bytes
        return max(1024, len(self.kv_groups()) * math.ceil(self.resolved_max_model_len
                                                            / self.block_size))

    @property
    def resolved_num_blocks(self) -> int | None:
        """None when a memory fraction sizes the cache (measured at engine start)."""
        if self.kv_memory_fraction is not None:
            return None
        return self.num_blocks_for(self.kv_bytes_per_block)

    def blocks_needed(self, groups: tuple[KVCacheGroup, ...]) -> int:
        """Blocks one full-length request can hold at once, over all groups."""
        return sum(max_blocks_per_request(parse_retention(g.policy), self.resolved_max_model_len,
                                          self.block_size, self.max_num_batched_tokens)
                   for g in groups)

    # JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(sorted(unknown)[0],
                              f"unknown setting; known ones are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)
