"""Decode step timing on caches prefilled with the same passages, shared by bench/kv_quant.py
and bench/retention.py: each configuration's cache (format, policy) holds the same text, and
the configurations' decode steps are interleaved, so a noisy neighbour slows every one alike."""

from __future__ import annotations

import statistics
import time

import torch

from engine.config import RunConfig
from engine.quality import PassageCache


def decode_tokens_per_s(configs: dict[str, RunConfig], loaded, passages: list[list[int]],
                        context: int, steps: int) -> dict[str, float]:
    """Median decode tokens/s per named configuration at batch len(passages)."""
    caches = {}
    for name, config in configs.items():
        # room for the timed decode steps after a full context
        cache = PassageCache(config, loaded, passages, context, context + steps)
        with torch.inference_mode():
            while cache.seqs[0].num_computed_tokens < context:
                n = min(256, context - cache.seqs[0].num_computed_tokens)
                cache.step([(s, n) for s in cache.seqs])
        caches[name] = cache
    times: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for i in range(steps):
            for name, cache in caches.items():
                for seq in cache.seqs:
                    seq.token_ids.append(passages[seq.request_id][i % len(passages[0])])
                start = time.perf_counter()
                cache.step([(s, 1) for s in cache.seqs])
                times[name].append(time.perf_counter() - start)
    return {name: len(passages) / statistics.median(t[2:]) for name, t in times.items()}
