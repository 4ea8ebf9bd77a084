"""The paged KV cache: per layer, K and V blocks of `block_size` tokens in one big tensor.

Layout (head-major): K and V are each `[num_layers, kv_heads, num_blocks, block_size, head_dim]`,
so one layer's cache is `[kv_heads, num_blocks, block_size, head_dim]`. A flat slot is
`block_id * block_size + offset` and indexes dim 1 of the `(kv_heads, num_slots, head_dim)` view.

Why head-major: decode reads a batch's blocks with a single `index_select` over the flattened
block table, and with heads outermost the result is already `(kv_heads, B, L, head_dim)`
contiguous, exactly what the grouped-query batched matmul wants. A block-major layout
`[num_blocks, block_size, kv_heads, head_dim]` (vLLM's) gathers to `(B, L, kv_heads, D)` and
then needs a permute copy (or a strided matmul) per layer. Measured on the 2-core CPU
(B=8, ctx 2048, 3 KV heads, D 64, fp32, shuffled block ids, medians, one process, interleaved;
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
(`zero_blocks`, called once per step by the model runner for all layers) and block 0, which pads
decode block tables, is zeroed at construction.
"""

from __future__ import annotations

import torch

from engine.attention import paged
from engine.models.config import LlamaConfig


class PagedKVCache:
    """K/V storage for `num_blocks` blocks. The block manager decides which request owns which
    block; this class only stores bytes and never changes its shape after construction."""

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (config.num_layers, config.num_kv_heads, num_blocks, block_size, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=self.device)
        self.v = torch.empty(shape, dtype=dtype, device=self.device)
        # per-layer views made once: indexing the 5-D tensor each layer costs dispatch time
        self.k_layers = list(self.k.unbind(0))
        self.v_layers = list(self.v.unbind(0))
        self.workspace = paged.Workspace()  # attention scratch, reused by every layer and step
        self.zero_blocks(torch.zeros(1, dtype=torch.int64, device=self.device))

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes_per_block(self) -> int:
        """K and V of every layer for one block."""
        return self.block_size * self.config.kv_bytes_per_token(self.k.element_size())

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer, each (kv_heads, num_blocks, block_size, head_dim)."""
        return self.k_layers[layer], self.v_layers[layer]

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store k, v (T, kv_heads, head_dim) of one layer at flat slots (T,)."""
        paged.write_kv(self.k_layers[layer], self.v_layers[layer], k, v, slot_mapping)

    def zero_blocks(self, block_ids: torch.Tensor) -> None:
        """Zero whole blocks in every layer (two ops, whatever the number of layers)."""
        self.k.index_fill_(2, block_ids, 0)
        self.v.index_fill_(2, block_ids, 0)
