"""The bytes of the paged KV cache: one tensor per spec tensor, shared by all groups.

Every group has the same shape (layout.py: `P` layers by `Hg` KV heads), so storage is built
for "layer positions" 0..P-1: tensor `k` is `[P, Hg, num_pages, block_size, head_dim]`, and the
p-th layer of every group reads and writes `k[p]`. A block id is owned by one group at a time,
so the groups never touch the same page. `num_pages` is the pool's blocks plus the null block
(the last page, zeros, never written), which fills decode padding and the table slots of blocks
given back mid-request.

Layout (head-major): one layer's K is `[kv_heads, num_pages, block_size, head_dim]`. A flat slot
is `block_id * block_size + offset` and indexes dim 1 of the `(kv_heads, num_slots, head_dim)`
view. Why head-major: decode reads a batch's blocks with a single `index_select` over the
flattened block table, and with heads outermost the result is already `(kv_heads, B, L,
head_dim)` contiguous, exactly what the grouped-query batched matmul wants. A block-major layout
`[num_blocks, block_size, kv_heads, head_dim]` (vLLM's) gathers to `(B, L, kv_heads, D)` and
then needs a permute copy (or a strided matmul) per layer. Measured on the 2-core CPU (B=8,
ctx 2048, 3 KV heads, D 64, fp32, shuffled block ids, medians, one process, interleaved;
neighbours on the machine make these drift +-30 %, so read the ratios):

    contiguous SDPA(enable_gqa), the baseline                       3.6-4.5 ms   1.00x
    head-major, row gather + grouped bmm/softmax, 3 MiB chunks      4.9-7.2 ms   1.3-1.9x
    head-major, index_select(dim=1), whole batch at once            7.2-8.6 ms   2.0-2.4x
    block-major gather + permute + matmul (machine loaded)                       ~8.5x
    block-major gather + SDPA(enable_gqa) (machine loaded)                       ~3.9x
    head-major, fused C kernel reading blocks in place (cpu_kernel.py)  2.9-3.4 ms   0.7-0.85x

Freshly allocated gathers are the hidden cost: every new multi-MB tensor is a fresh mmap whose
page faults cost more than the attention (6.4x SDPA without reuse), hence the Workspace in
engine/attention/paged.py. `python bench/paged_attention.py` prints the current figures.

Memory: `torch.empty`, so pages are committed only when written and RSS tracks use. Never-
written memory may hold any bit pattern, and masked decode positions still multiply V by a zero
probability (0 * NaN = NaN), so every block is zeroed when it receives its first token
(`zero_blocks`, called once per step by the model runner for all layers), and the null page is
zeroed at construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.kv_cache.layout import make_groups, parse_policy
from engine.kv_cache.residual import Residual
from engine.kv_cache.spec import KVCacheGroup, KVCacheSpec

if TYPE_CHECKING:
    from engine.models.config import LlamaConfig

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "int8": torch.int8, "uint8": torch.uint8, "fp8": torch.float8_e4m3fn}
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class LayerCache:
    """One layer's share of the cache held by one group: its KV heads `kv_heads` (a range of
    the layer's heads) and the storage views it reads and writes, e.g. `tensors["k"]` of shape
    `(len(kv_heads), num_pages, block_size, head_dim)`."""

    group_id: int
    layer: int
    kv_heads: range
    spec: KVCacheSpec
    tensors: dict[str, torch.Tensor]
    null_block: int
    # quantized formats: this layer's full-precision residual K and V (kv_heads, slots, bs, D)
    residual: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class PagedKVCache:
    """Storage for `num_blocks` pool blocks of `groups`. The pool decides which request owns
    which block; this class only stores bytes and never changes its shape after construction."""

    def __init__(self, groups: tuple[KVCacheGroup, ...], num_blocks: int,
                 device: torch.device | str, residual_slots: int = 64, commit: bool = False):
        shapes = {(len(g.layers), len(g.kv_heads), g.spec) for g in groups}
        if len(shapes) != 1:
            raise ValueError("every KV cache group must have one shape and spec (layout.py)")
        self.groups = groups
        self.spec = groups[0].spec
        self.num_blocks = num_blocks
        self.null_block = num_blocks
        self.block_size = self.spec.block_size
        self.device = torch.device(device)
        positions = len(groups[0].layers)
        # `commit`: zeroed, so every page is resident from the start (as a GPU allocation is)
        # and the process's memory shows the cache; else pages are committed as they are used
        make = torch.zeros if commit else torch.empty
        self.storage = {t.name: make((positions, *t.storage_shape(num_blocks + 1)),
                                     dtype=TORCH_DTYPES[t.dtype], device=self.device)
                        for t in self.spec.tensors}
        # quantized formats keep the blocks being filled in full precision (KIVI's residual);
        # block ids are pool-wide, so one residual serves every group. fp32 whatever the
        # weights: it is a few blocks, and the CPU kernel reads it as it is
        self.residual = None
        if self.spec.uses_residual:
            self.residual = Residual(positions, self.spec.num_kv_heads, self.spec.head_dim,
                                     self.block_size, residual_slots * len(groups),
                                     torch.float32, self.device)
        self.layers: dict[int, list[LayerCache]] = {}  # layer -> its groups' shares, by head
        for g in groups:
            for p, layer in enumerate(g.layers):
                views = {name: t[p] for name, t in self.storage.items()}
                heads = range(g.kv_heads[0], g.kv_heads[-1] + 1)
                residual = self.residual.layer(p) if self.residual is not None else None
                self.layers.setdefault(layer, []).append(
                    LayerCache(g.group_id, layer, heads, self.spec, views, self.null_block,
                               residual))
        for caches in self.layers.values():
            caches.sort(key=lambda c: c.kv_heads.start)
        self.zero_blocks(torch.tensor([self.null_block], device=self.device))

    @classmethod
    def for_model(cls, model_config: LlamaConfig, num_blocks: int, block_size: int,
                  kv_dtype: str = "fp32", device: torch.device | str = "cpu",
                  policy: str = "full", rotate: bool = False) -> PagedKVCache:
        """A cache laid out as the engine would for this model and policy (tests, benches)."""
        regions = parse_policy(policy, model_config.num_layers, model_config.num_kv_heads)
        groups = make_groups(regions, lambda heads: model_config.kv_cache_spec(
            block_size, kv_dtype, heads, rotate))
        return cls(groups, num_blocks, device)

    @property
    def page_size_bytes(self) -> int:
        """One pool block: a page of every tensor of every layer position (equal for all groups)."""
        return self.groups[0].page_size_bytes

    @property
    def capacity_bytes(self) -> int:
        """The pool's blocks (the null page is not counted: it holds nothing)."""
        return self.num_blocks * self.page_size_bytes

    @property
    def allocated_bytes(self) -> int:
        """What the storage tensors really occupy, null page included (not the residual)."""
        return sum(t.numel() * t.element_size() for t in self.storage.values())

    @property
    def allocated_bytes_per_token(self) -> float:
        """Measured, not derived from the spec: the storage tensors' bytes over the token
        slots of every page (the null page included on both sides), summed over the groups
        that share the storage."""
        slots = (self.num_blocks + 1) * self.block_size
        return self.allocated_bytes / slots * len(self.groups)

    @property
    def residual_bytes(self) -> int:
        """The full-precision residual of a quantized format (0 for float formats)."""
        return self.residual.allocated_bytes if self.residual is not None else 0

    def layer_caches(self, layer: int) -> list[LayerCache]:
        return self.layers[layer]

    def zero_blocks(self, block_ids: torch.Tensor) -> None:
        """Zero whole pages in every layer position (one op per tensor)."""
        for spec in self.spec.tensors:
            t = self.storage[spec.name]
            if t.dtype == torch.float8_e4m3fn:  # no index_fill for fp8; its zero is all 0 bits
                t = t.view(torch.uint8)
            t.index_fill_(2 if spec.head_major else 1, block_ids, 0)
