"""Which KV heads need their whole cache? DuoAttention's split, calibrated on the held set.

DuoAttention keeps the full cache for "retrieval" heads and only a sink + recent window for
"streaming" heads. We score each (layer, KV head) by how much attention it pays outside such a
window: the passages are prefilled through an fp32 full cache, their last `num_queries` tokens
are fed one decode step at a time, and for each of those queries the attention probability that
falls on tokens outside the first `sink` and the last `recent` is summed over the KV head's
query heads and averaged over queries and passages (0: the head never looks outside the window;
1: it looks nowhere else). The heads with the highest scores keep the full cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import paged
from engine.attention.layer import Attention
from engine.config import RunConfig
from engine.models.loader import LoadedModel
from engine.quality import PassageCache


class _Recorder(Attention):
    """An Attention that also keeps the decode queries it was given (after RoPE)."""

    def __init__(self, inner: Attention) -> None:
        kv_heads = sum(len(c.kv_heads) for c in inner.caches)
        super().__init__(inner.layer, inner.caches, inner.group * kv_heads, kv_heads,
                         inner.backend)
        self.queries: list[torch.Tensor] = []  # (B, H, D) per decode step

    def forward(self, q, k, v, metadata):
        if metadata[0].num_prefill_tokens == 0:
            self.queries.append(q.detach().clone())
        return super().forward(q, k, v, metadata)


@dataclass(slots=True)
class HeadScores:
    scores: list[list[float]]  # [layer][kv head]: attention mass outside the window
    sink: int
    recent: int

    def policy(self, full_fraction: float, window: str) -> str:
        """The heads with the top `full_fraction` of scores full, the others `window`."""
        flat = sorted(((s, layer, h) for layer, row in enumerate(self.scores)
                       for h, s in enumerate(row)), reverse=True)
        keep = {(layer, h) for _, layer, h in flat[:round(full_fraction * len(flat))]}
        parts = []
        for layer, row in enumerate(self.scores):
            for h in range(len(row)):
                parts.append(f"{layer}/h{h}:{'full' if (layer, h) in keep else window}")
        return "; ".join(_merge(parts))


def _merge(parts: list[str]) -> list[str]:
    """Neighbouring heads of one layer with one policy become one range ('0/h1-2:...')."""
    out: list[tuple[int, int, int, str]] = []
    for part in parts:
        where, policy = part.split(":", 1)
        layer, head = (int(x) for x in where.split("/h"))
        if out and out[-1][0] == layer and out[-1][2] == head - 1 and out[-1][3] == policy:
            out[-1] = (layer, out[-1][1], head, policy)
        else:
            out.append((layer, head, head, policy))
    return [f"{layer}/h{lo}{'' if lo == hi else f'-{hi}'}:{policy}"
            for layer, lo, hi, policy in out]


def score_heads(loaded: LoadedModel, passages: list[list[int]], *, sink: int = 4,
                recent: int = 128, num_queries: int = 32) -> HeadScores:
    """Each KV head's attention mass outside a sink + recent window (see the module)."""
    context = len(passages[0]) - 1
    config = RunConfig(model=loaded.config.name, device=loaded.device.type,
                       max_model_len=context + 1)
    cache = PassageCache(config, loaded, passages, context - num_queries, context)
    recorders = [_Recorder(a) for a in cache.runner.attention]
    cache.runner.attention = recorders
    with torch.inference_mode():
        while cache.seqs[0].num_computed_tokens < context - num_queries:
            n = min(256, context - num_queries - cache.seqs[0].num_computed_tokens)
            cache.step([(s, n) for s in cache.seqs])
        for j in range(num_queries):
            for seq, p in zip(cache.seqs, passages, strict=True):
                seq.token_ids.append(p[context - num_queries + j])
            cache.step([(s, 1) for s in cache.seqs])
        scores = [_layer_scores(r, cache, context - num_queries, sink, recent, loaded)
                  for r in recorders]
    return HeadScores(scores, sink, recent)


def _layer_scores(recorder: _Recorder, cache: PassageCache, first: int, sink: int,
                  recent: int, loaded: LoadedModel) -> list[float]:
    (share,) = recorder.caches  # calibration runs one full group
    hk, group = len(share.kv_heads), recorder.group
    totals = torch.zeros(hk, dtype=torch.float64)
    for b, seq in enumerate(cache.seqs):
        table = torch.tensor(seq.block_tables[0], device=loaded.device)
        keys = paged.gather_blocks(share["k"], table).float()  # (Hk, L, D)
        for j, queries in enumerate(recorder.queries):
            pos = first + j
            q = queries[b].float().view(hk, group, -1)  # (Hk, G, D)
            scale = loaded.model.attention_scale
            logits = torch.bmm(q, keys[:, :pos + 1].transpose(1, 2)) * scale  # (Hk, G, pos+1)
            probs = torch.softmax(logits, dim=-1)  # (Hk, G, pos + 1)
            inside = torch.zeros(pos + 1, dtype=torch.bool, device=probs.device)
            inside[:sink] = True
            inside[max(0, pos + 1 - recent):] = True
            totals += probs[:, :, ~inside].sum(dim=(1, 2)).double().cpu() / group
    count = len(cache.seqs) * len(recorder.queries)
    return (totals / count).tolist()
