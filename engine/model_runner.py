"""Turns the scheduler's batch into one flat forward pass and returns next-token logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import paged, scores
from engine.attention.backends import select_backend
from engine.attention.layer import Attention
from engine.attention.metadata import AttentionMetadata
from engine.kv_cache.retention import parse_retention
from engine.kv_cache.storage import PagedKVCache
from engine.models.loader import LoadedModel
from engine.sequence import Sequence


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    metadata: list[AttentionMetadata]  # one per KV cache group
    logits_indices: torch.Tensor  # (N,) rows of the hidden states to turn into logits
    fresh_blocks: torch.Tensor | None  # blocks receiving their first token this step
    order: list[int]  # request ids in the step's token order (prefill items, then decodes)


class ModelRunner:
    """Owns no request state: `execute` reads sequences and block tables, never modifies them.
    The KV cache it writes is shared with the KV cache manager's view of which blocks are live;
    the per-layer `Attention` objects (backend chosen once) are built here, for this cache."""

    def __init__(self, loaded: LoadedModel, kv_cache: PagedKVCache, mla_path: str = "auto"):
        self.loaded = loaded
        self.model = loaded.model
        self.kv_cache = kv_cache
        self.device = loaded.device
        self.block_size = kv_cache.block_size
        self.num_groups = len(kv_cache.groups)
        config = loaded.config
        scale = loaded.model.attention_scale
        workspace = paged.Workspace()  # scratch reused by every layer and step
        self.attention = [
            Attention(layer, kv_cache.layer_caches(layer), config.num_heads,
                      config.num_kv_heads,
                      select_backend(kv_cache.spec, self.device, scale, workspace, mla_path))
            for layer in range(config.num_layers)
        ]
        # groups whose retention policy scores blocks by attention (h2o, snapkv)
        self.scored = {g.group_id: parse_retention(g.policy) for g in kv_cache.groups
                       if parse_retention(g.policy).needs_attention}
        self.attention_mass: list[tuple[int, int, np.ndarray]] = []  # last step's

    def execute(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute `n` new tokens of each (seq, n); return fp32 logits (N, vocab) for the items
        whose chunk ends at the last token of `seq.token_ids`, in batch order."""
        with torch.inference_mode():
            inputs = self.prepare(batch)
            if inputs.fresh_blocks is not None and self.kv_cache.residual is None:
                # (quantized pages are written whole; their residual slots are zeroed instead)
                self.kv_cache.zero_blocks(inputs.fresh_blocks)
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.metadata,
                                self.attention)  # (T, C)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # (N, V)
        self.attention_mass = [
            (g, rid, mass.cpu().numpy()) for g in self.scored
            for rid, mass in zip(inputs.order, scores.collected(inputs.metadata[g]),
                                 strict=True) if mass is not None]
        if self.kv_cache.residual is not None:  # completed blocks are quantized now
            for meta in inputs.metadata:
                self.kv_cache.residual.release(meta.complete_blocks.tolist())
        return logits

    @staticmethod
    def is_decode(seq: Sequence, n: int) -> bool:
        return n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens

    def prepare(self, batch: list[tuple[Sequence, int]]) -> StepInputs:
        """Flatten the batch, prefill chunks first, and build the index tensors: positions are
        shared, block tables and slots are per group."""
        prefill = [(i, s, n) for i, (s, n) in enumerate(batch) if not self.is_decode(s, n)]
        decode = [(i, s) for i, (s, n) in enumerate(batch) if self.is_decode(s, n)]
        last_row: dict[int, int] = {}  # batch index -> flat row of its last token
        ids, positions, query_lens, context_lens = _prefill_rows(prefill, last_row)
        dec_pos = np.fromiter((s.num_computed_tokens for _, s in decode), np.int64, len(decode))
        num_prefill = len(ids)
        for row, (i, seq) in enumerate(decode):
            ids.append(seq.token_ids[seq.num_computed_tokens])
            if seq.num_computed_tokens + 1 == len(seq.token_ids):
                last_row[i] = num_prefill + row
        flat_positions = np.concatenate([*positions, dec_pos])
        metadata, fresh = [], []
        for g in range(self.num_groups):
            meta, slots = self._group_metadata(g, prefill, decode, dec_pos, query_lens,
                                               context_lens)
            metadata.append(meta)
            fresh.append(slots[slots % self.block_size == 0] // self.block_size)
        fresh_blocks = np.concatenate(fresh)
        rows = [last_row[i] for i in range(len(batch)) if i in last_row]
        for g, retention in self.scored.items():
            items = [(n, s.num_computed_tokens + n, s.num_prompt_tokens,
                      len(metadata[g].prefill_block_tables[j]))
                     for j, (_, s, n) in enumerate(prefill)]
            scores.prepare(metadata[g], retention.name, retention.window, items, len(decode))
        return StepInputs(
            input_ids=self._to_device(np.asarray(ids, dtype=np.int64)),
            positions=self._to_device(flat_positions),
            metadata=metadata,
            logits_indices=self._to_device(np.asarray(rows, dtype=np.int64)),
            fresh_blocks=self._to_device(fresh_blocks) if len(fresh_blocks) else None,
            order=[s.request_id for _, s, _ in prefill] + [s.request_id for _, s in decode],
        )

    def _group_metadata(self, g: int, prefill: list[tuple[int, Sequence, int]],
                        decode: list[tuple[int, Sequence]], dec_pos: np.ndarray,
                        query_lens: list[int], context_lens: list[int]
                        ) -> tuple[AttentionMetadata, np.ndarray]:
        """Group g's tables and slot mapping; prefill chunks are few and long (vectorised
        within a chunk), decodes one token per request (only table rows are copied)."""
        bs, null = self.block_size, self.kv_cache.null_block
        slots, tables = [], []
        for _, seq, n in prefill:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = np.asarray(seq.block_tables[g][: -(-end // bs)], dtype=np.int64)
            pos = np.arange(start, end, dtype=np.int64)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table)
        max_blocks = int(dec_pos.max()) // bs + 1 if len(decode) else 0
        dec_tables = np.full((len(decode), max_blocks), null, dtype=np.int64)  # padding: null
        for row, (_, seq) in enumerate(decode):
            n_blocks = int(dec_pos[row]) // bs + 1
            dec_tables[row, :n_blocks] = seq.block_tables[g][:n_blocks]
        slots.append(dec_tables[np.arange(len(decode)), dec_pos // bs] * bs + dec_pos % bs)
        flat_slots = np.concatenate(slots)
        meta = AttentionMetadata(
            slot_mapping=self._to_device(flat_slots),
            num_prefill_tokens=sum(query_lens),
            prefill_query_lens=query_lens,
            prefill_context_lens=context_lens,
            prefill_block_tables=[self._to_device(t) for t in tables],
            decode_context_lens=self._to_device(dec_pos + 1),
            decode_block_tables=self._to_device(dec_tables),
        )
        if self.kv_cache.residual is not None:
            self._residual_metadata(meta, flat_slots, tables, context_lens, dec_tables, dec_pos)
        return meta, flat_slots

    def _residual_metadata(self, meta: AttentionMetadata, flat_slots: np.ndarray,
                           tables: list[np.ndarray], context_lens: list[int],
                           dec_tables: np.ndarray, dec_pos: np.ndarray) -> None:
        """Quantized caches: route every new token to its block's full-precision residual slot,
        list the blocks completed this step, and each request's open last block."""
        residual, bs = self.kv_cache.residual, self.block_size
        blocks, offsets = flat_slots // bs, flat_slots % bs
        slot_of = {int(b): residual.slot_for(int(b)) for b in np.unique(blocks)}
        slot_ids = np.fromiter((slot_of[int(b)] for b in blocks), np.int64, len(blocks))
        done = np.unique(blocks[offsets == bs - 1])
        meta.residual_slot_mapping = self._to_device(slot_ids * bs + offsets)
        meta.complete_blocks = self._to_device(done)
        meta.complete_slots = self._to_device(
            np.fromiter((slot_of[int(b)] for b in done), np.int64, len(done)))

        def tail(table: np.ndarray, context_len: int) -> int:
            if context_len % bs == 0:  # its last block is full: quantized this step or before
                return -1
            return residual.slot_for(int(table[(context_len - 1) // bs]))

        meta.prefill_tail_slots = [tail(t, n) for t, n in zip(tables, context_lens, strict=True)]
        meta.decode_tail_slots = self._to_device(np.fromiter(
            (tail(dec_tables[r], int(p) + 1) for r, p in enumerate(dec_pos)), np.int64,
            len(dec_pos)))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)


def _prefill_rows(items: list[tuple[int, Sequence, int]], last_row: dict[int, int]
                  ) -> tuple[list[int], list[np.ndarray], list[int], list[int]]:
    """Token ids, positions, query and context lengths of the prefill chunks, in batch order."""
    ids: list[int] = []
    positions, query_lens, context_lens = [], [], []
    for i, seq, n in items:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        ids.extend(seq.token_ids[start:end])
        positions.append(np.arange(start, end, dtype=np.int64))
        query_lens.append(n)
        context_lens.append(end)
        if end == len(seq.token_ids):
            last_row[i] = len(ids) - 1
    return ids, positions, query_lens, context_lens
