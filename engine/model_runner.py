"""Turns the scheduler's batch into one flat forward pass and returns next-token logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata
from engine.kv_cache import PagedKVCache
from engine.models.loader import LoadedModel
from engine.sequence import Sequence


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # (N,) rows of the hidden states to turn into logits
    fresh_blocks: torch.Tensor | None  # blocks receiving their first token this step


class ModelRunner:
    """Owns no request state: `execute` reads sequences and block tables, never modifies them.
    The KV cache it writes is shared with the block manager's view of which blocks are live."""

    def __init__(self, loaded: LoadedModel, kv_cache: PagedKVCache):
        self.loaded = loaded
        self.model = loaded.model
        self.kv_cache = kv_cache
        self.device = loaded.device
        self.block_size = kv_cache.block_size

    def execute(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute `n` new tokens of each (seq, n); return fp32 logits (N, vocab) for the items
        whose chunk ends at the last token of `seq.token_ids`, in batch order."""
        with torch.inference_mode():
            inputs = self.prepare(batch)
            if inputs.fresh_blocks is not None:
                self.kv_cache.zero_blocks(inputs.fresh_blocks)
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta,
                                self.kv_cache)  # (T, C)
            return self.model.compute_logits(hidden[inputs.logits_indices])  # (N, V)

    @staticmethod
    def is_decode(seq: Sequence, n: int) -> bool:
        return n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens

    def prepare(self, batch: list[tuple[Sequence, int]]) -> StepInputs:
        """Flatten the batch, prefill chunks first, and build the index tensors."""
        prefill = [(i, s, n) for i, (s, n) in enumerate(batch) if not self.is_decode(s, n)]
        decode = [(i, s) for i, (s, n) in enumerate(batch) if self.is_decode(s, n)]
        last_row: dict[int, int] = {}  # batch index -> flat row of its last token
        pre = self._prefill_part(prefill, last_row)
        dec = self._decode_part(decode, len(pre.ids), last_row)
        flat_slots = np.concatenate([*pre.slots, dec.slots])
        fresh = flat_slots[flat_slots % self.block_size == 0] // self.block_size
        meta = AttentionMetadata(
            slot_mapping=self._to_device(flat_slots),
            num_prefill_tokens=len(pre.ids),
            prefill_query_lens=pre.query_lens,
            prefill_context_lens=pre.context_lens,
            prefill_block_tables=[self._to_device(t) for t in pre.tables],
            decode_context_lens=self._to_device(dec.positions + 1),
            decode_block_tables=self._to_device(dec.tables),
        )
        rows = [last_row[i] for i in range(len(batch)) if i in last_row]
        return StepInputs(
            input_ids=self._to_device(np.asarray(pre.ids + dec.ids, dtype=np.int64)),
            positions=self._to_device(np.concatenate([*pre.positions, dec.positions])),
            meta=meta,
            logits_indices=self._to_device(np.asarray(rows, dtype=np.int64)),
            fresh_blocks=self._to_device(fresh) if len(fresh) else None,
        )

    def _prefill_part(self, items: list[tuple[int, Sequence, int]], last_row: dict[int, int]
                      ) -> _PrefillPart:
        """Prefill chunks are few and long: vectorise within a chunk, loop over chunks."""
        bs = self.block_size
        part = _PrefillPart()
        for i, seq, n in items:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = np.asarray(seq.block_table[: -(-end // bs)], dtype=np.int64)
            pos = np.arange(start, end, dtype=np.int64)
            part.ids.extend(seq.token_ids[start:end])
            part.positions.append(pos)
            part.slots.append(table[pos // bs] * bs + pos % bs)
            part.query_lens.append(n)
            part.context_lens.append(end)
            part.tables.append(table)
            if end == len(seq.token_ids):
                last_row[i] = len(part.ids) - 1
        return part

    def _decode_part(self, items: list[tuple[int, Sequence]], first_row: int,
                     last_row: dict[int, int]) -> _DecodePart:
        """One token per request; the only per-request Python work is copying table rows."""
        bs = self.block_size
        pos = np.fromiter((s.num_computed_tokens for _, s in items), np.int64, len(items))
        max_blocks = int(pos.max()) // bs + 1 if items else 0
        tables = np.zeros((len(items), max_blocks), dtype=np.int64)  # padding: block 0
        ids = []
        for row, (i, seq) in enumerate(items):
            n_blocks = int(pos[row]) // bs + 1
            tables[row, :n_blocks] = seq.block_table[:n_blocks]
            ids.append(seq.token_ids[seq.num_computed_tokens])
            if seq.num_computed_tokens + 1 == len(seq.token_ids):
                last_row[i] = first_row + row
        slots = tables[np.arange(len(items)), pos // bs] * bs + pos % bs
        return _DecodePart(ids, pos, tables, slots)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)


@dataclass(slots=True)
class _PrefillPart:
    ids: list[int] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    slots: list[np.ndarray] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    tables: list[np.ndarray] = field(default_factory=list)


@dataclass(slots=True)
class _DecodePart:
    ids: list[int]
    positions: np.ndarray  # (Bd,) position of each new token
    tables: np.ndarray  # (Bd, max_blocks)
    slots: np.ndarray  # (Bd,)
