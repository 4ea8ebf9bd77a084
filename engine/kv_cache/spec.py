"""What the KV cache stores: per-layer specs, declared by the model, and the layer groups.

Plain data (no torch), so a RunConfig can be validated and a budget turned into blocks before
any weights load. Bytes per block are computed here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Element sizes of the cache's storage dtypes (names as in RunConfig; torch types in storage.py).
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "uint8": 1}
ATTENTION_KINDS = ("full", "sliding_window", "latent")
FLOAT_FORMATS = ("fp32", "bf16", "fp16")
# Quantized formats: bits per value (fp8 is e4m3 with one scale per tensor, vLLM's default).
QUANTIZED_BITS = {"fp8": 8, "int8": 8, "int4": 4}
KV_FORMATS = FLOAT_FORMATS + tuple(QUANTIZED_BITS)
# INT8/INT4 values are quantized per token over groups of this many channels (KIVI's value
# groups). One group per 64-channel head keeps a token's metadata to 4 bytes per head, which is
# what lets a block of 128 tokens reach ~1.9x (int8) and ~3.6x (int4) the blocks of bf16.
VALUE_GROUP = 64
# Latent caches quantize c_kv per token in tiles of this many values with one fp32 scale each,
# and keep the RoPE key in bf16: FlashMLA's FP8 layout (512 values, 4 scales, 64 bf16 = 656 B).
LATENT_TILE = 128
LATENT_FORMATS = FLOAT_FORMATS + ("fp8", "int8")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor a layer keeps per block. `block_shape` is one block of one layer; with
    `head_major` its first axis is the KV head and storage puts the page axis second
    (`(heads, pages, *rest)`), else storage is `(pages, *block_shape)`."""

    name: str  # "k", "v"; later "k_scale", "latent", ...
    dtype: str  # a DTYPE_BYTES key
    block_shape: tuple[int, ...]
    head_major: bool = True

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * DTYPE_BYTES[self.dtype]

    def storage_shape(self, num_pages: int) -> tuple[int, ...]:
        if self.head_major:
            return (self.block_shape[0], num_pages, *self.block_shape[1:])
        return (num_pages, *self.block_shape)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """What one layer stores per block of `block_size` tokens, everything included (the scales
    and minimums of a quantized format too): the unit every byte figure of the cache is built
    from. `kv_dtype` names the format; `rotate` says keys (and queries) are turned by a fixed
    Hadamard rotation before they are stored."""

    attention: str  # one of ATTENTION_KINDS; picks the manager and the attention backend
    block_size: int
    kv_dtype: str  # one of KV_FORMATS
    tensors: tuple[TensorSpec, ...]
    rotate: bool = False
    num_kv_heads: int = 0  # of this layer share (the tensors' head axis)
    head_dim: int = 0  # of K and V as attention sees them (before any packing)
    # latent caches: the width of c_kv; the rest of head_dim is the RoPE key k_pe
    latent_rank: int = 0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention kind {self.attention!r} is not one of {ATTENTION_KINDS}")

    @property
    def quantized(self) -> bool:
        """Whether full blocks are stored quantized (the block being filled stays in the
        full-precision residual until it is full)."""
        return self.kv_dtype in QUANTIZED_BITS

    @property
    def uses_residual(self) -> bool:
        """Whether the block being filled waits in a full-precision residual: KIVI keys are
        quantized per channel over a whole block. Latent formats quantize each token as it is
        written (FlashMLA's per-token tiles), so they need none."""
        return self.quantized and self.attention != "latent"

    @property
    def bits(self) -> int:
        return QUANTIZED_BITS.get(self.kv_dtype, 8 * DTYPE_BYTES.get(self.kv_dtype, 4))

    @property
    def page_size_bytes(self) -> int:
        """One block of one layer."""
        return sum(t.block_bytes for t in self.tensors)

    @property
    def bytes_per_token(self) -> float:
        return self.page_size_bytes / self.block_size

    def tensor(self, name: str) -> TensorSpec:
        return next(t for t in self.tensors if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        out = {"attention": self.attention, "block_size": self.block_size,
               "kv_dtype": self.kv_dtype, "rotate": self.rotate,
               "page_size_bytes": self.page_size_bytes,
               "tensors": {t.name: {"dtype": t.dtype, "block_shape": list(t.block_shape)}
                           for t in self.tensors}}
        if self.attention == "latent":
            out["latent_rank"] = self.latent_rank
        return out


def full_attention_spec(num_kv_heads: int, head_dim: int, block_size: int,
                        kv_dtype: str, rotate: bool = False) -> KVCacheSpec:
    """K and V of `num_kv_heads` heads, head-major (each block of one layer is (heads,
    block_size, ...)), in a float format or quantized with its scales beside the data."""
    hk, bs, d = num_kv_heads, block_size, head_dim
    if kv_dtype in FLOAT_FORMATS or kv_dtype == "fp8":
        tensors = (TensorSpec("k", kv_dtype, (hk, bs, d)), TensorSpec("v", kv_dtype, (hk, bs, d)))
    elif kv_dtype in QUANTIZED_BITS:
        packed = d * QUANTIZED_BITS[kv_dtype] // 8  # int4: two values a byte
        group = min(VALUE_GROUP, d)
        if d % group or d % 2:
            raise ValueError(f"{kv_dtype} needs an even head dim that is a multiple of "
                             f"{group}, not {d}")
        groups = d // group
        tensors = (
            TensorSpec("k", "uint8", (hk, bs, packed)),
            TensorSpec("k_scale", "fp16", (hk, d)), TensorSpec("k_min", "fp16", (hk, d)),
            TensorSpec("v", "uint8", (hk, bs, packed)),
            TensorSpec("v_scale", "fp16", (hk, bs, groups)),
            TensorSpec("v_min", "fp16", (hk, bs, groups)),
        )
    else:
        raise ValueError(f"unknown KV cache format {kv_dtype!r}; choose one of {KV_FORMATS}")
    if rotate and (kv_dtype not in QUANTIZED_BITS or d & (d - 1)):
        raise ValueError("a Hadamard rotation needs a quantized cache (fp8, int8, int4) and a "
                         f"power-of-two head dim (here {kv_dtype}, {d})")
    return KVCacheSpec("full", block_size, kv_dtype, tensors, rotate, hk, d)


def latent_tile(kv_lora_rank: int) -> int:
    """Values per scale of a quantized latent: 128 (FlashMLA) or the largest power of two
    dividing the rank, so a converted model's odd rank still splits into whole tiles."""
    tile = math.gcd(kv_lora_rank, LATENT_TILE)
    if tile < 16:
        raise ValueError(f"a quantized latent needs a kv_lora_rank divisible by 16, not "
                         f"{kv_lora_rank}; use a float kv_dtype or another rank")
    return tile


def latent_attention_spec(kv_lora_rank: int, rope_dim: int, block_size: int,
                          kv_dtype: str, rotate: bool = False) -> KVCacheSpec:
    """MLA's cache (vLLM's MLAAttentionSpec): one entry per token, `[c_kv ; k_pe]` of
    kv_lora_rank + rope_dim values, no K/V pair. Stored as one "head" (head-major with a head
    axis of 1, so the paged gathers of full attention serve it too). fp8 and int8 store c_kv
    as 8-bit values with a fp32 scale per tile of each token and k_pe in bf16."""
    if rotate:
        raise ValueError("a Hadamard rotation is for K/V caches; a latent cache takes none")
    width, bs = kv_lora_rank + rope_dim, block_size
    if kv_dtype in FLOAT_FORMATS:
        tensors = (TensorSpec("latent", kv_dtype, (1, bs, width)),)
    elif kv_dtype in ("fp8", "int8"):
        tiles = kv_lora_rank // latent_tile(kv_lora_rank)
        tensors = (TensorSpec("latent", kv_dtype, (1, bs, kv_lora_rank)),
                   TensorSpec("latent_scale", "fp32", (1, bs, tiles)),
                   TensorSpec("rope", "bf16", (1, bs, rope_dim)))
    else:
        raise ValueError(f"a latent (MLA) cache cannot be {kv_dtype!r}; choose one of "
                         f"{LATENT_FORMATS}")
    return KVCacheSpec("latent", block_size, kv_dtype, tensors, False, 1, width, kv_lora_rank)


@dataclass(frozen=True, slots=True)
class KVCacheGroup:
    """Layers (and a range of their KV heads) that share one spec and one block table per
    request. A pool block of this group holds one page of `spec` for each of its layers."""

    group_id: int
    layers: tuple[int, ...]
    kv_heads: tuple[int, ...]  # contiguous: which of each layer's KV heads the group holds
    spec: KVCacheSpec  # of one layer's share (its `kv_heads` only)
    policy: str = field(default="full")

    @property
    def page_size_bytes(self) -> int:
        """What one pool block of this group costs: every layer of the group, all tensors."""
        return self.spec.page_size_bytes * len(self.layers)

    @property
    def bytes_per_token(self) -> float:
        return self.page_size_bytes / self.spec.block_size

    def to_dict(self) -> dict[str, Any]:
        return {"group_id": self.group_id, "layers": _ranges(self.layers),
                "kv_heads": _ranges(self.kv_heads), "policy": self.policy,
                "page_size_bytes": self.page_size_bytes, "spec": self.spec.to_dict()}


def _ranges(values: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5' for summaries people read."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return ",".join(parts)


def kv_bytes_per_token(groups: tuple[KVCacheGroup, ...]) -> float:
    """What one token of context costs across all groups (every layer, every head)."""
    return sum(g.bytes_per_token for g in groups)
