"""KIVI's residual in a paged cache: blocks being filled stay in full precision until full.

A quantized format needs a block's statistics (keys are quantized per channel over the block's
tokens), so a block is quantized once, when its last token is written. Until then its tokens
live here: a small pool of full-precision slots, one per open block, laid out like the cache
(`[layer position, kv heads, slots, block_size, head_dim]`). Every new token is written to its
block's slot; a block whose last token arrives is quantized from its slot into its page and
the slot is released. So the only tokens ever read in full precision are the most recent ones
of each request (its last, open block).

How many slots: a step can touch `max_num_batched_tokens / block_size` blocks plus one partial
block per request at each end of its chunk, and running requests that were not scheduled keep
their open block: `residual_capacity()`. The residual is fixed memory beside the pool,
reported as such (it is not part of `page_size_bytes`).
"""

from __future__ import annotations

import torch


def residual_capacity(max_num_batched_tokens: int, max_num_seqs: int, block_size: int) -> int:
    """Slots one group needs at most at any time (see the module docstring)."""
    return -(-max_num_batched_tokens // block_size) + 2 * max_num_seqs + 1


class Residual:
    """Full-precision slots for open blocks. The model runner assigns slots when it prepares a
    step and releases them when blocks complete; the engine releases the slots of blocks the
    pool freed. Slot contents are never trusted past what has been written: reads are masked
    by context length, and a block is only quantized once all its positions were rewritten."""

    def __init__(self, positions: int, num_kv_heads: int, head_dim: int, block_size: int,
                 capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (positions, num_kv_heads, capacity, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.block_size = block_size
        self._slot: dict[int, int] = {}  # open block id -> slot
        self._free = list(range(capacity - 1, -1, -1))  # a stack: reuse recent slots

    @property
    def num_open(self) -> int:
        return len(self._slot)

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def slot_of(self, block_id: int) -> int | None:
        return self._slot.get(block_id)

    def slot_for(self, block_id: int) -> int:
        """The block's slot, assigned (and zeroed) on its first write."""
        slot = self._slot.get(block_id)
        if slot is None:
            if not self._free:
                raise RuntimeError(f"the KV residual is full ({self.capacity} open blocks); "
                                   "this is a bug in the slot accounting")
            slot = self._slot[block_id] = self._free.pop()
            # never-written memory may hold NaN patterns, and masked positions still meet a
            # zero probability (0 * NaN = NaN)
            self.k[:, :, slot].zero_()
            self.v[:, :, slot].zero_()
        return slot

    def release(self, block_ids: list[int]) -> None:
        """Forget blocks that completed (now quantized) or were freed."""
        for block_id in block_ids:
            slot = self._slot.pop(block_id, None)
            if slot is not None:
                self._free.append(slot)

    def layer(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (kv_heads, slots, block_size, head_dim) of one layer position's K and V."""
        return self.k[position], self.v[position]
