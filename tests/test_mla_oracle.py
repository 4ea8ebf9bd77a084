"""MLA through the paged latent cache equals transformers' DeepseekV2ForCausalLM (fp32, CPU).

Three tiny random checkpoints written by transformers and read by our folder loader: dense
MLPs with a query LoRA and YaRN RoPE; MoE layers (shared + routed experts, group-limited
routing) without a query LoRA; and a DeepSeek-V3 (sigmoid routing with its correction bias,
normalised top-k, half-split RoPE). Three requests of different lengths run batched through
block size 16: chunked prefill mixed with decodes, and the third request reuses the first's
two full blocks (a prefix-cache hit: its prefill attends to cached entries it did not
compute). Every logit
row the engine produces (each prefill's last token, then 16 decode steps) is compared with
transformers' logits of the same sequence computed without a cache, for both attention paths.

Tolerance: max |ours - theirs| <= 5e-5 with logits of std ~1.2 (fp32; the paths reassociate
sums differently from transformers' eager attention; measured max 1.0e-5).
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.kv_cache.storage import PagedKVCache
from engine.model_runner import ModelRunner
from engine.models.loader import load_model
from engine.sequence import Sequence
from tests.mla_oracle import DENSE, MOE, V3, hf_logits, make_deepseek

BLOCK = 16
DECODE_STEPS = 16
CHUNK = 24
ATOL = 5e-5


@pytest.fixture(scope="module", params=["dense", "moe", "v3"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"deepseek-{request.param}")
    hf = make_deepseek(folder, {"dense": DENSE, "moe": MOE, "v3": V3}[request.param])
    ours = load_model(str(folder), torch.device("cpu"), torch.float32)
    return hf, ours


class Blocks:
    def __init__(self, n: int):
        self.free = list(range(n))
        random.Random(0).shuffle(self.free)

    def grow(self, seq: Sequence, tokens: int) -> None:
        (table,) = seq.block_tables
        while len(table) * BLOCK < tokens:
            table.append(self.free.pop())


def serve(runner: ModelRunner, prompts: list[list[int]], shared: int
          ) -> tuple[list[Sequence], list[list[torch.Tensor]]]:
    """Prompts 0 and 1 start together (chunked prefill); prompt 2 starts once prompt 0's
    prefill is done, reusing its first `shared` tokens' blocks. Greedy; logits per sequence."""
    blocks = Blocks(64)
    seqs = [Sequence(i, list(p), len(p), DECODE_STEPS + 1, block_tables=([],))
            for i, p in enumerate(prompts)]
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    active = seqs[:2]
    while any(s.num_output_tokens <= DECODE_STEPS for s in seqs):
        if seqs[2] not in active and seqs[0].num_computed_tokens >= len(prompts[0]):
            seqs[2].block_tables[0].extend(seqs[0].block_tables[0][:shared // BLOCK])
            seqs[2].num_computed_tokens = shared
            active.append(seqs[2])
        batch = []
        for s in active:
            if s.num_output_tokens > DECODE_STEPS:
                continue
            n = min(CHUNK, s.num_tokens - s.num_computed_tokens)
            blocks.grow(s, s.num_computed_tokens + n)
            batch.append((s, n))
        rows = runner.execute(batch)
        done = [s for s, n in batch if s.num_computed_tokens + n == s.num_tokens]
        for s, n in batch:
            s.num_computed_tokens += n
        for s, row in zip(done, rows, strict=True):
            logits[s.request_id].append(row)
            s.token_ids.append(int(row.argmax()))
    return seqs, logits


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_paged_mla_matches_transformers(pair, path):
    hf, loaded = pair
    rng = random.Random(1)
    p0 = [rng.randrange(49152) for _ in range(45)]
    prompts = [p0, [rng.randrange(49152) for _ in range(21)],
               p0[:32] + [rng.randrange(49152) for _ in range(9)]]
    cache = PagedKVCache.for_model(loaded.config, 64, BLOCK, "fp32", loaded.device)
    runner = ModelRunner(loaded, cache, mla_path=path)
    seqs, logits = serve(runner, prompts, shared=32)
    for seq, rows in zip(seqs, logits, strict=True):
        assert len(rows) == DECODE_STEPS + 1
        theirs = hf_logits(hf, seq.token_ids[:-1])[seq.num_prompt_tokens - 1:]  # (17, V)
        ours = torch.stack(rows)
        assert theirs.std() > 0.5, "the oracle's logits carry no signal"
        err = (ours - theirs).abs().max().item()
        assert err <= ATOL, f"request {seq.request_id}, {path}: max |diff| {err:.2e}"
        assert seq.output_token_ids == theirs.argmax(-1).tolist()


def test_auto_path_matches_both(pair):
    """auto mixes the paths (absorbed decode, prefill by cost): same logits."""
    hf, loaded = pair
    rng = random.Random(2)
    p0 = [rng.randrange(49152) for _ in range(40)]
    prompts = [p0, [rng.randrange(49152) for _ in range(7)], p0[:16] + [5, 6, 7]]
    cache = PagedKVCache.for_model(loaded.config, 64, BLOCK, "fp32", loaded.device)
    seqs, logits = serve(ModelRunner(loaded, cache, mla_path="auto"), prompts, shared=16)
    for seq, rows in zip(seqs, logits, strict=True):
        theirs = hf_logits(hf, seq.token_ids[:-1])[seq.num_prompt_tokens - 1:]
        assert (torch.stack(rows) - theirs).abs().max().item() <= ATOL
