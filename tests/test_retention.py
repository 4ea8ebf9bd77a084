"""Selective retention: policies parsed from the typed syntax, window groups bounded however
long a request runs, H2O and SnapKV keeping exactly the blocks their scores say, blocks
given back to one pool, and the trace replaying to the pool at every step for every policy."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import assert_events_rebuild_keyframes

from engine.attention import scores
from engine.config import ConfigError, RunConfig, SamplingConfig
from engine.kv_cache import KVCacheManager
from engine.kv_cache.layout import PolicyError, parse_policy
from engine.kv_cache.retention import pyramid_budgets
from engine.quality import evaluate, held_set, passage_tokens
from engine.run import run
from engine.trace import ListSink
from engine.workload import WorkloadRequest

FIXED = SamplingConfig(ignore_eos=True)


def live_blocks_per_request(sink: ListSink) -> dict[tuple[int, int], int]:
    """The most blocks each (request, group) held at the end of any step, from the events."""
    held: dict[tuple[int, int], set[int]] = {}
    peak: dict[tuple[int, int], int] = {}
    for step in sorted({e.step for e in sink.block_events}):
        for e in (e for e in sink.block_events if e.step == step):
            key = (e.request_id, e.group_id)
            if e.kind in ("allocate", "touch"):
                held.setdefault(key, set()).add(e.block_id)
            elif e.kind in ("free", "free_head", "drop"):
                held.get(key, set()).discard(e.block_id)
        for key, blocks in held.items():
            peak[key] = max(peak.get(key, 0), len(blocks))
    return peak


def test_the_policy_syntax_and_its_errors():
    regions = parse_policy("0:full; 1-28:window(4,256); 29:full", 30, 3)
    assert [(r.layers, r.policy) for r in regions] == [
        (range(0, 1), "full"), (range(1, 29), "window(4,256)"), (range(29, 30), "full")]
    heads = parse_policy("0-29/h0:full; 0-29/h1-2:h2o(64, 128)", 30, 3)
    assert [(r.kv_heads, r.policy) for r in heads] == [(range(0, 1), "full"),
                                                       (range(1, 3), "h2o(64,128)")]
    with pytest.raises(PolicyError, match=r"character 8 .*window takes 2 .*e\.g\. 0-14:full"):
        parse_policy("0:full; 1-29:window(4)", 30, 3)
    with pytest.raises(PolicyError, match="unknown policy 'lru'"):
        parse_policy("lru(3)", 30, 3)
    with pytest.raises(ConfigError, match="policy"):
        RunConfig(policy="0-9:full")  # layers 10-29 have none


def test_pyramid_budgets_fall_with_depth_and_sum_to_the_total():
    budgets = pyramid_budgets("pyramid(total=3840, beta=20)", 30)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 2 * budgets[-1]
    assert abs(sum(budgets) - 3840) <= 30  # rounding per layer
    regions = parse_policy("pyramid(total=3840, beta=20, window=16)", 30, 3)
    assert len(regions) == 30 and regions[0].policy == f"snapkv({budgets[0]},16)"


def test_a_window_group_stays_bounded_and_its_blocks_serve_others(tiny_model):
    """One long request under window(4,32) with block size 8 never holds more than
    ceil(36 / 8) + 1 = 6 blocks; a later request takes blocks it gave back."""
    requests = [WorkloadRequest(0, prompt_token_ids=list(range(100, 140)), max_tokens=420),
                WorkloadRequest(1, prompt_token_ids=list(range(300, 330)), max_tokens=20,
                                arrival=0.4)]
    config = RunConfig(model="tiny", device="cpu", policy="window(4,32)", block_size=8,
                       num_blocks=16, max_model_len=512, max_num_batched_tokens=32,
                       keyframe_interval=5, sampling=FIXED)
    sink = ListSink()
    result = run(config, sink, model=tiny_model, requests=requests)
    assert result.summary.num_finished == 2
    assert live_blocks_per_request(sink)[0, 0] <= math.ceil(36 / 8) + 1
    dropped = {e.block_id for e in sink.block_events if e.kind == "drop" and e.request_id == 0}
    reused = {e.block_id for e in sink.block_events if e.kind == "allocate"
              and e.request_id == 1}
    assert dropped & reused, "the second request got none of the first one's dropped blocks"
    assert {e.reason for e in sink.block_events if e.kind == "drop"} == {"out of window"}
    assert_events_rebuild_keyframes(sink)


@pytest.mark.slow
def test_a_window_group_stays_bounded_over_2000_generated_tokens(smollm2):
    config = RunConfig(model="smollm2", device="cpu", policy="window(4,256)", block_size=16,
                       num_blocks=64, max_model_len=2100, max_num_batched_tokens=64,
                       keyframe_interval=100, sampling=FIXED)
    request = WorkloadRequest(0, prompt_token_ids=smollm2.tokenizer.encode(
        "Tell me a very long story about a KV cache.")[:30], max_tokens=2000)
    sink = ListSink()
    result = run(config, sink, model=smollm2, requests=[request])
    assert result.summary.output_tokens == 2000
    assert live_blocks_per_request(sink)[0, 0] <= math.ceil(260 / 16) + 1
    assert result.summary.peak_blocks_used <= math.ceil(260 / 16) + 1


def test_full_everywhere_is_the_engine_without_policies(tiny_model):
    requests = [WorkloadRequest(i, prompt_token_ids=[7] * 30 + [i] * 9, max_tokens=16)
                for i in range(4)]
    base = dict(model="tiny", device="cpu", num_blocks=32, max_model_len=128, sampling=FIXED)
    plain = ListSink()
    plain_result = run(RunConfig(**base), plain, model=tiny_model, requests=requests)
    explicit = ListSink()
    explicit_result = run(RunConfig(policy="0-1/h0-1:full", **base), explicit,
                          model=tiny_model, requests=requests)
    assert explicit_result.output_token_ids == plain_result.output_token_ids
    assert [(e.step, e.block_id, e.kind) for e in explicit.block_events] == [
        (e.step, e.block_id, e.kind) for e in plain.block_events]


def manager_with(policy: str, num_tokens: int, block_size: int = 4) -> KVCacheManager:
    """One request of `num_tokens` computed tokens in a one-group pool under `policy`."""
    groups = RunConfig(model="tiny", policy=policy, block_size=block_size,
                       max_model_len=64).kv_groups()
    kv = KVCacheManager(groups, 64, enable_prefix_caching=False)
    assert kv.allocate(0, num_tokens)
    return kv


def test_h2o_drops_the_older_blocks_with_the_least_attention():
    """h2o(8, 8) at block size 4 keeps 4 blocks: the 2 recent ones and the 2 heaviest older."""
    kv = manager_with("h2o(8,8)", num_tokens=32)  # 8 blocks
    kv.add_attention(0, 0, [0.5, 3.0, 0.1, 2.0, 0.2, 9.0, 1.0, 1.0])
    assert kv.retain(0, 32, 32) == 4
    (table,) = kv.block_tables(0)
    null = kv.null_block
    kept = [i for i, b in enumerate(table) if b != null]
    assert kept == [1, 5, 6, 7]  # the recent blocks 6, 7 and the two heaviest of 0-5
    kv.check_invariants()


def test_snapkv_keeps_the_window_and_the_top_voted_prompt_blocks_once():
    kv = manager_with("snapkv(8,4)", num_tokens=28)  # 7 blocks: window = the last block
    kv.add_attention(0, 0, [5.0, 0.1, 4.0, 0.2, 0.3, 7.0, 1.0])
    assert kv.retain(0, 24, 28) == 0  # the prompt is not all in yet
    assert kv.retain(0, 28, 28) == 4
    (table,) = kv.block_tables(0)
    kept = [i for i, b in enumerate(table) if b != kv.null_block]
    assert kept == [0, 5, 6]  # the 2 best voted (8 tokens) + the window's block
    assert kv.allocate(0, 40) and kv.retain(0, 40, 28) == 0  # decode blocks stay
    kv.check_invariants()


def test_attention_mass_is_summed_per_block_from_a_hand_made_pattern():
    """Keys of block 2 point where the query looks: the mass lands there, so H2O keeps it."""
    bs, d = 4, 16
    keys = torch.zeros(1, 6 * bs, d)  # (Hk, L, D): six blocks
    keys[0, 2 * bs:3 * bs, 0] = 8.0  # block 2 answers the query
    q = torch.zeros(1, 2, d)  # (n, H, D): one query, two heads on the one KV head
    q[0, :, 0] = 1.0
    table = torch.arange(6)
    mass = scores._token_mass(q, keys, torch.tensor([6 * bs - 1]), table, bs, null=99,
                              scale=1.0)
    per_block = scores._per_block(mass, 6, bs)
    assert per_block.argmax() == 2 and per_block.sum().item() == pytest.approx(2.0)


@pytest.mark.parametrize("policy", ["window(4,16)", "h2o(16,16)", "snapkv(16,8)",
                                    "0:full; 1:window(4,8)", "0-1/h0:full; 0-1/h1:h2o(8,8)",
                                    "pyramid(total=48, beta=4, window=8)"])
def test_every_policy_replays_to_the_pool_at_every_step(tiny_model, policy):
    requests = [WorkloadRequest(i, prompt_token_ids=[7] * 40 + [i] * (20 + 7 * i),
                                max_tokens=40 + 5 * i, arrival=0.0) for i in range(5)]
    config = RunConfig(model="tiny", device="cpu", policy=policy, block_size=8, num_blocks=120,
                       max_model_len=256, keyframe_interval=1, max_num_seqs=4, sampling=FIXED)
    sink = ListSink()
    result = run(config, sink, model=tiny_model, requests=requests)
    assert result.summary.num_finished == 5
    assert any(e.kind == "drop" for e in sink.block_events)
    assert_events_rebuild_keyframes(sink)


def test_quality_reports_the_bytes_a_window_actually_held(tiny_model):
    passages = passage_tokens(held_set(2), tiny_model.tokenizer, 128)
    config = RunConfig(model="tiny", device="cpu", max_model_len=129)
    full = evaluate(config, tiny_model, passages, context=128, num_scored=16)
    window = evaluate(config.replace(policy="window(4,32)"), tiny_model, passages,
                      context=128, num_scored=16)
    assert window.policy == "window(4,32)"
    assert window.kv_bytes_per_token < full.kv_bytes_per_token / 2


def test_head_calibration_scores_every_kv_head_and_writes_a_policy(tiny_model):
    from engine.head_calibration import HeadScores, score_heads

    passages = passage_tokens(held_set(2), tiny_model.tokenizer, 96)
    result = score_heads(tiny_model, passages, sink=4, recent=16, num_queries=8)
    assert len(result.scores) == 2 and all(len(row) == 2 for row in result.scores)
    # near-uniform attention of random weights: the share of tokens outside the window
    assert all(0.6 < s < 0.95 for row in result.scores for s in row)
    crafted = HeadScores([[0.9, 0.1, 0.2], [0.05, 0.8, 0.7]], sink=4, recent=16)
    policy = crafted.policy(0.5, "window(4,16)")
    assert policy == "0/h0:full; 0/h1-2:window(4,16); 1/h0:window(4,16); 1/h1-2:full"
    assert len(parse_policy(policy, 2, 3)) == 4
