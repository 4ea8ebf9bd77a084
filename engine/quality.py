"""What a KV cache format or retention policy costs in quality, measured on the real model.

Method (the same for every candidate): each passage's first `context - num_scored` tokens are
prefilled through the paged cache in chunks, then its last `num_scored` tokens are
teacher-forced one decode step at a time, so every scored position attends to cached
(quantized, or retained) blocks. The fp32 full cache runs the same steps in lockstep; at each
scored position the candidate's next-token distribution is compared with the reference's:
mean KL(ref || candidate), top-1 agreement, and the perplexity of both on the text's real next
tokens. The harness checks itself: an fp32 full-cache candidate scores KL 0 and top-1 1.0
exactly (it runs the very same operations as the reference). The reference may be another
model (`reference=`): a model converted from it (cli.py convert-mla) is then scored on what
the conversion costs, its cache format included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.config import RunConfig
from engine.device import dtype_name
from engine.kv_cache.manager import KVCacheManager
from engine.kv_cache.residual import residual_capacity
from engine.kv_cache.storage import PagedKVCache
from engine.model_runner import ModelRunner
from engine.models.loader import LoadedModel
from engine.quality_result import QualityResult
from engine.sequence import Sequence

HELD_SET_DIR = Path(__file__).resolve().parent / "data" / "heldout"
PREFILL_CHUNK = 256  # tokens per passage per prefill step (8 passages: 2,048 tokens a step)


class QualityError(ValueError):
    """Input the harness cannot score (too short a text, no texts); the message says why."""


def held_set(num_passages: int | None = 8) -> list[str]:
    """The bundled passages (engine/data/heldout, public domain; see its README); None: all."""
    files = sorted(HELD_SET_DIR.glob("*.txt"))
    num_passages = len(files) if num_passages is None else num_passages
    if num_passages > len(files):
        raise QualityError(f"the held set has {len(files)} passages, not {num_passages}; "
                           "ask for fewer or give --text-file")
    return [f.read_text(encoding="utf-8") for f in files[:num_passages]]


def split_text(text: str, tokenizer: Any, context: int, max_passages: int) -> list[list[int]]:
    """A long text file cut into consecutive windows of `context + 1` tokens."""
    ids = tokenizer.encode(text)
    n = min(max_passages, len(ids) // (context + 1))
    if n == 0:
        raise QualityError(f"the text has {len(ids)} tokens; scoring needs at least "
                           f"{context + 1} (context + 1); lower --context or give more text")
    return [ids[i * (context + 1):(i + 1) * (context + 1)] for i in range(n)]


def passage_tokens(texts: list[str], tokenizer: Any, context: int) -> list[list[int]]:
    """Each passage's first `context + 1` tokens (the +1 is the last position's target)."""
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if len(ids) < context + 1:
            raise QualityError(f"passage {i + 1} has {len(ids)} tokens; scoring needs "
                               f"{context + 1} (context + 1); lower --context")
        out.append(ids[:context + 1])
    return out


class PassageCache:
    """One cache format's pool, storage and runner, holding the passages as sequences (also
    what bench/kv_quant.py times decode steps on)."""

    def __init__(self, config: RunConfig, loaded: LoadedModel, passages: list[list[int]],
                 prompt_len: int, context: int) -> None:
        self.groups = config.kv_groups(config.resolved_kv_dtype(loaded.device.type,
                                                                dtype_name(loaded.dtype)))
        bs = config.block_size
        per_seq = -(-(context + 1) // bs)  # room for every token a sequence will hold
        num_blocks = len(self.groups) * len(passages) * per_seq
        self.kv = KVCacheManager(self.groups, num_blocks, enable_prefix_caching=False)
        self.storage = PagedKVCache(
            self.groups, num_blocks, loaded.device,
            residual_slots=residual_capacity(PREFILL_CHUNK * len(passages), len(passages), bs))
        self.runner = ModelRunner(loaded, self.storage, config.mla_path)
        self.seqs = [Sequence(i, list(p[:prompt_len]), prompt_len, max_tokens=context)
                     for i, p in enumerate(passages)]

    def step(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        for seq, n in batch:
            if not self.kv.allocate(seq.request_id, seq.num_computed_tokens + n):
                raise RuntimeError("the quality harness sized its pool too small")  # a bug
            seq.block_tables = self.kv.block_tables(seq.request_id)
        logits = self.runner.execute(batch)
        for group_id, request_id, mass in self.runner.attention_mass:
            self.kv.add_attention(group_id, request_id, mass)
        for seq, n in batch:
            seq.num_computed_tokens += n
            self.kv.retain(seq.request_id, seq.num_computed_tokens, seq.num_prompt_tokens)
        self._release_freed()
        return logits

    def _release_freed(self) -> None:
        if self.storage.residual is not None:
            freed = [e.block_id for e in self.kv.drain_events()
                     if e.ref_count == 0 and e.kind in ("free", "free_head", "drop")]
            self.storage.residual.release(freed)
        else:
            self.kv.drain_events()

    @property
    def bytes_held(self) -> int:
        return self.kv.num_used_blocks * self.groups[0].page_size_bytes


def evaluate(config: RunConfig, loaded: LoadedModel, passages: list[list[int]], *,
             context: int = 2048, num_scored: int = 256, source: str = "held set",
             on_progress: Callable[[float], None] | None = None,
             reference: LoadedModel | None = None) -> QualityResult:
    """Score `config`'s cache (kv_dtype, kv_rotate, policy, block_size) against the fp32 full
    cache of `reference` (default: the same model) on `passages` (each `context + 1`
    tokens)."""
    return evaluate_many([config], loaded, passages, context=context, num_scored=num_scored,
                         source=source, on_progress=on_progress, reference=reference)[0]


def evaluate_many(configs: list[RunConfig], loaded: LoadedModel, passages: list[list[int]], *,
                  context: int = 2048, num_scored: int = 256, source: str = "held set",
                  on_progress: Callable[[float], None] | None = None,
                  reference: LoadedModel | None = None) -> list[QualityResult]:
    """`evaluate` for several candidates in lockstep with one reference run."""
    if not 1 <= num_scored < context:
        raise QualityError(f"num_scored must be in 1..{context - 1} (the context), "
                           f"got {num_scored}")
    limit = loaded.config.max_position_embeddings
    if context + 1 > limit:
        raise QualityError(f"context {context} needs {context + 1} positions but "
                           f"{loaded.config.name} has {limit}; lower --context")
    ref_model = reference or loaded
    ref_config = configs[0].replace(model=ref_model.config.name, kv_dtype="fp32",
                                    kv_rotate=False, policy="full")
    start, prompt_len = time.monotonic(), context - num_scored
    caches = [PassageCache(ref_config, ref_model, passages, prompt_len, context)]
    caches += [PassageCache(c, loaded, passages, prompt_len, context) for c in configs]
    total_steps = -(-prompt_len // PREFILL_CHUNK) + num_scored
    done = 0
    sums = torch.zeros(len(configs), 4, dtype=torch.float64)  # kl, top-1, nll ref, nll
    with torch.inference_mode():
        while caches[0].seqs[0].num_computed_tokens < prompt_len:  # prefill, chunk by chunk
            n = min(PREFILL_CHUNK, prompt_len - caches[0].seqs[0].num_computed_tokens)
            for cache in caches:
                cache.step([(s, n) for s in cache.seqs])
            done += 1
            if on_progress:
                on_progress(done / total_steps)
        for j in range(num_scored):
            fed = prompt_len + j  # position of the token fed now; its successor is the target
            targets = torch.tensor([p[fed + 1] for p in passages])
            logits = []
            for cache in caches:
                for seq, p in zip(cache.seqs, passages, strict=True):
                    seq.token_ids.append(p[fed])
                logits.append(cache.step([(s, 1) for s in cache.seqs]).float().cpu())
            for i, cand in enumerate(logits[1:]):
                sums[i] += _compare(logits[0], cand, targets)
            done += 1
            if on_progress:
                on_progress(done / total_steps)
    elapsed = time.monotonic() - start
    return [_result(c, cache, s, loaded, passages, context, num_scored, source, elapsed)
            for c, cache, s in zip(configs, caches[1:], sums, strict=True)]


def _result(config: RunConfig, cache: PassageCache, sums: torch.Tensor, loaded: LoadedModel,
            passages: list[list[int]], context: int, num_scored: int, source: str,
            elapsed: float) -> QualityResult:
    scored = num_scored * len(passages)
    kl, hits, nll_ref, nll = (sums / scored).tolist()
    return QualityResult(
        kl_mean=kl, top1=hits, ppl_ref=math.exp(nll_ref), ppl=math.exp(nll),
        kv_bytes_per_token=cache.bytes_held / (len(passages) * context),
        kv_dtype=config.resolved_kv_dtype(loaded.device.type, dtype_name(loaded.dtype)),
        kv_rotate=config.kv_rotate,
        policy=config.policy, model=config.model, block_size=config.block_size,
        context=context, num_passages=len(passages), num_tokens_scored=scored, source=source,
        elapsed_s=elapsed)


def _compare(ref: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sums over the batch: KL(ref || cand), top-1 agreements, NLL of ref and of cand."""
    lp_ref = torch.log_softmax(ref.double(), dim=-1)  # (B, V)
    lp = torch.log_softmax(cand.double(), dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(dim=-1)  # (B,)
    agree = (ref.argmax(dim=-1) == cand.argmax(dim=-1)).double()
    rows = torch.arange(len(targets))
    return torch.stack([kl.sum(), agree.sum(), -lp_ref[rows, targets].sum(),
                        -lp[rows, targets].sum()])
