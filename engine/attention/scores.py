"""Attention mass per block, for the retention policies that score blocks (h2o, snapkv).

Computed beside the attention itself (the fused kernel never materialises probabilities), only
for groups whose policy asks, and only for the queries that count: every query for H2O, the
last `window` prompt queries for SnapKV (whose votes are then smoothed with a width-5 average
pool, as SnapKV does, before they are summed per block). The mass is the attention probability
summed over the layer's query heads; the model runner adds it up over the group's layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata
from engine.kv_cache.storage import LayerCache

POOL_KERNEL = 5  # SnapKV's observation-window vote smoothing


def accumulate(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, backend,
               scale: float) -> None:
    """Add this layer's block mass for the step's scored queries into `meta`."""
    bs, null = cache.spec.block_size, cache.null_block
    start = 0
    for i, (qlen, ctx, table) in enumerate(zip(meta.prefill_query_lens,
                                               meta.prefill_context_lens,
                                               meta.prefill_block_tables, strict=True)):
        n_q = meta.prefill_score_queries[i]
        if n_q:
            chunk = q[start + qlen - n_q:start + qlen]  # (n_q, H, D): the chunk's last queries
            keys = backend.score_keys(cache, table[None], ctx,
                                      meta.prefill_tail_slots[i] if meta.prefill_tail_slots
                                      else -1)[0]  # (Hk, L, D)
            positions = torch.arange(ctx - n_q, ctx, device=q.device)  # (n_q,)
            mass = _token_mass(backend.score_query(chunk), keys, positions, table, bs, null,
                               scale)  # (L,)
            if meta.mass_mode == "snapkv":
                mass = F.avg_pool1d(mass[None, None], POOL_KERNEL, stride=1,
                                    padding=POOL_KERNEL // 2, count_include_pad=False)[0, 0]
            meta.prefill_mass[i] += _per_block(mass, table.shape[0], bs)
        start += qlen
    if meta.decode_mass is not None and meta.num_decode_tokens:
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        for row in range(tables.shape[0]):  # decodes are few: one request at a time
            ctx = int(lens[row])
            tail = int(meta.decode_tail_slots[row]) if meta.decode_tail_slots is not None else -1
            keys = backend.score_keys(cache, tables[row:row + 1], ctx, tail)[0]  # (Hk, L, D)
            query = backend.score_query(q[meta.num_prefill_tokens + row:][:1])  # (1, H, D)
            mass = _token_mass(query, keys, torch.tensor([ctx - 1]), tables[row], bs, null,
                               scale)
            meta.decode_mass[row] += _per_block(mass, tables.shape[1], bs)


def _token_mass(q: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                table: torch.Tensor, block_size: int, null: int, scale: float) -> torch.Tensor:
    """Attention probabilities of queries q (n, H, D) at `positions` over keys (Hk, L, D),
    causal and without null blocks, summed over queries and heads -> (L,)."""
    n, h, d = q.shape
    hk, length, _ = keys.shape
    qg = q.float().view(n, hk, h // hk, d).permute(1, 0, 2, 3).reshape(hk, -1, d)  # (Hk,nG,D)
    scores = torch.bmm(qg, keys.float().transpose(1, 2)) * scale  # (Hk, n*G, L)
    scores = scores.view(hk, n, h // hk, length)
    pos = torch.arange(length, device=q.device)
    masked = pos[None, :] > positions[:, None].to(q.device)  # (n, L): the future
    masked = masked | (table == null).repeat_interleave(block_size)[:length][None, :]
    scores.masked_fill_(masked[None, :, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1).sum(dim=(0, 1, 2))  # (L,)


def _per_block(token_mass: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    padded = torch.zeros(num_blocks * block_size, dtype=token_mass.dtype,
                         device=token_mass.device)
    padded[:token_mass.shape[0]] = token_mass
    return padded.view(num_blocks, block_size).sum(dim=1)  # (num_blocks,)


def prepare(meta: AttentionMetadata, mode: str, window: int,
            prefill: list[tuple[int, int, int, int]], num_decodes: int) -> None:
    """Set up a group's step for scoring: `prefill` items are (chunk length, context length
    after the chunk, prompt length, table length); H2O scores every query, SnapKV only the last
    `window` prompt queries, in the chunk that completes the prompt."""
    meta.mass_mode = mode
    counts = []
    for qlen, end, prompt_len, _ in prefill:
        if mode == "h2o":
            counts.append(qlen)
        else:
            counts.append(min(window, qlen) if end == prompt_len else 0)
    meta.prefill_score_queries = counts
    meta.prefill_mass = [torch.zeros(n_blocks, device=meta.slot_mapping.device)
                         for *_, n_blocks in prefill]
    if mode == "h2o" and num_decodes:
        meta.decode_mass = torch.zeros(meta.decode_block_tables.shape,
                                       device=meta.slot_mapping.device)


def collected(meta: AttentionMetadata) -> list[torch.Tensor | None]:
    """The step's mass per request in the step's order (prefill items, then decodes); None
    where nothing was scored."""
    out: list[torch.Tensor | None] = [m if n else None for m, n in
                                      zip(meta.prefill_mass, meta.prefill_score_queries,
                                          strict=True)]
    if meta.decode_mass is not None:
        out.extend(meta.decode_mass.unbind(0))
    else:
        out.extend([None] * meta.num_decode_tokens)
    return out
