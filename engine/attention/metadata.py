"""What attention needs to know about one engine step, built once and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _empty_long() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.int64)


@dataclass(slots=True)
class AttentionMetadata:
    """The step's T tokens are flattened: the prefill chunks of each prefill request first (each
    contiguous, in `prefill_*` order), then one token per decoding request.

    One per KV cache group: positions are shared by all groups, block tables and slots are the
    group's own. Only the model runner (or a test) builds this; attention reads it.
    `decode_attn_bias` is a per-step cache that paged attention fills on first use so the
    group's layers share one mask.
    """

    slot_mapping: torch.Tensor  # (T,) int64: block_id * block_size + offset of every new token
    num_prefill_tokens: int = 0
    prefill_query_lens: list[int] = field(default_factory=list)
    # tokens in the cache after this step, the cached prefix included
    prefill_context_lens: list[int] = field(default_factory=list)
    prefill_block_tables: list[torch.Tensor] = field(default_factory=list)  # (n_blocks,) int64
    decode_context_lens: torch.Tensor = field(default_factory=_empty_long)  # (Bd,), new token incl.
    # (Bd, max_blocks), padded with block 0; the padding is masked by decode_context_lens
    decode_block_tables: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))
    decode_attn_bias: torch.Tensor | None = None  # (Bd, 1, 1, L): 0 or -inf, built lazily
    # Quantized caches only (engine/kv_cache/residual.py): every new token's slot in the
    # full-precision residual (slot * block_size + offset), the blocks whose last token is
    # written this step (quantized from their residual slots before attention reads), and
    # each request's open last block as a residual slot, or -1 when that block is full.
    residual_slot_mapping: torch.Tensor | None = None  # (T,)
    complete_blocks: torch.Tensor | None = None  # (n,) block ids
    complete_slots: torch.Tensor | None = None  # (n,) their residual slots
    prefill_tail_slots: list[int] = field(default_factory=list)
    decode_tail_slots: torch.Tensor | None = None  # (Bd,)
    # Retention policies that score blocks (h2o, snapkv; engine/attention/scores.py): how many
    # of each prefill chunk's last queries to score (0: none), and where each request's
    # attention mass per block is summed over the group's layers and query heads.
    mass_mode: str | None = None  # "h2o" | "snapkv"
    prefill_score_queries: list[int] = field(default_factory=list)
    prefill_mass: list[torch.Tensor] = field(default_factory=list)  # (n_blocks,) each
    decode_mass: torch.Tensor | None = None  # (Bd, n_blocks)

    @property
    def num_decode_tokens(self) -> int:
        return int(self.decode_context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
