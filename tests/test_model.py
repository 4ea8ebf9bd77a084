"""Greedy outputs of our paged SmolLM2 equal transformers' token for token (fp32, CPU).

Both models get OUR token ids, so this compares the models, not the tokenizers. Blocks come
from a trivial local allocator handing out shuffled ids (the real block manager is tested on
its own), so the block tables are scattered.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.kv_cache.storage import PagedKVCache
from engine.model_runner import ModelRunner
from engine.models.config import TINY_LLAMA
from engine.models.loader import load_model
from engine.sequence import Sequence

NEW_TOKENS = 32  # the length of the oracle_expected fixture
BLOCK_SIZE = 16


class LocalAllocator:
    """Hands out block ids in a fixed shuffled order, to one KV cache group."""

    def __init__(self, num_blocks: int, seed: int = 0):
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        if not seq.block_tables:
            seq.block_tables = ([],)
        (table,) = seq.block_tables
        while len(table) * BLOCK_SIZE < num_tokens:
            table.append(self.free.pop())


def generate(runner: ModelRunner, alloc: LocalAllocator, seqs: list[Sequence],
             prefill_chunk: int, new_tokens: int) -> None:
    """Step all sequences together: prompt chunks of at most `prefill_chunk`, then decodes."""
    while any(s.num_output_tokens < new_tokens for s in seqs):
        batch = []
        for s in seqs:
            if s.num_output_tokens >= new_tokens:
                continue
            n = min(prefill_chunk, s.num_tokens - s.num_computed_tokens)
            alloc.grow(s, s.num_computed_tokens + n)
            batch.append((s, n))
        logits = runner.execute(batch)
        done = [s for s, n in batch if s.num_computed_tokens + n == s.num_tokens]
        assert logits.shape == (len(done), runner.model.config.vocab_size)
        assert logits.dtype == torch.float32
        for s, n in batch:
            s.num_computed_tokens += n
        for s, row in zip(done, logits.argmax(-1).tolist(), strict=True):
            s.token_ids.append(row)


def make_seqs(prompts: list[list[int]]) -> list[Sequence]:
    return [Sequence(i, list(p), len(p), NEW_TOKENS) for i, p in enumerate(prompts)]


@pytest.mark.slow
def test_one_prompt_at_a_time_matches_transformers(smollm2, oracle_prompts,
                                                   oracle_expected):
    cache = PagedKVCache.for_model(smollm2.config, 64, BLOCK_SIZE, "fp32", smollm2.device)
    runner = ModelRunner(smollm2, cache)
    for i in range(5):
        (seq,) = make_seqs([oracle_prompts[i]])
        generate(runner, LocalAllocator(64, seed=i), [seq], 10_000, NEW_TOKENS)
        assert seq.output_token_ids == oracle_expected[i], f"prompt {i}"


@pytest.mark.slow
def test_eight_prompts_batched_with_chunked_prefill_match_transformers(
        smollm2, oracle_prompts, oracle_expected):
    prompts = oracle_prompts
    assert len({len(p) for p in prompts}) == len(prompts), "prompt lengths should all differ"
    cache = PagedKVCache.for_model(smollm2.config, 256, BLOCK_SIZE, "fp32", smollm2.device)
    runner = ModelRunner(smollm2, cache)
    seqs = make_seqs(prompts)
    # chunks of 40: long prompts need two steps, so steps mix prefill chunks with decodes
    generate(runner, LocalAllocator(256, seed=99), seqs, 40, NEW_TOKENS)
    for i, seq in enumerate(seqs):
        assert seq.output_token_ids == oracle_expected[i], f"prompt {i}"


def test_tiny_model_is_deterministic_and_batch_invariant():
    """Same seed -> same weights; a request's logits do not depend on its batch neighbours."""
    a = load_model("tiny", torch.device("cpu"), torch.float32, seed=3)
    b = load_model("tiny", torch.device("cpu"), torch.float32, seed=3)
    assert a.config is TINY_LLAMA
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                              strict=True):
        assert torch.equal(pa, pb), name
    prompts = [[5, 6, 7, 8, 9] * 7, [11, 12, 13], list(range(100, 150))]
    outs = []
    for group in ([prompts[0]], prompts):
        cache = PagedKVCache.for_model(a.config, 64, BLOCK_SIZE, "fp32", a.device)
        seqs = make_seqs(group)
        generate(ModelRunner(a, cache), LocalAllocator(64), seqs, 16, 6)
        outs.append(seqs[0].output_token_ids)
    assert outs[0] == outs[1]


def test_runner_does_not_modify_sequences(tiny_model):
    cache = PagedKVCache.for_model(tiny_model.config, 16, BLOCK_SIZE, "fp32", tiny_model.device)
    seq = Sequence(0, [1, 2, 3, 4], 4, 8, block_tables=([3],))
    logits = ModelRunner(tiny_model, cache).execute([(seq, 2)])  # a first chunk: no logits
    assert logits.shape == (0, tiny_model.config.vocab_size)
    assert (seq.token_ids, seq.num_computed_tokens, seq.block_tables) == ([1, 2, 3, 4], 0, ([3],))
