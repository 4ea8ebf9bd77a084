"""Sampling: greedy is argmax, cuts never leak, and per-row seeds make draws repeat."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import SamplingConfig
from engine.sampling import Sampler, _mix32_, row_seed, sample

VOCAB = 1000
GREEDY = SamplingConfig()
WARM = SamplingConfig(temperature=1.0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _seeds(rows: int, seed: int) -> list[int]:
    """One seed per row, as the engine derives them (row i: request i at position 0)."""
    return [row_seed(seed, i, 0) for i in range(rows)]


def _logits(rows: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=_generator(seed)) * 3  # (N, V)


def test_greedy_is_argmax_whatever_the_seeds() -> None:
    logits = _logits()
    assert sample(logits, GREEDY, _seeds(8, 0)) == logits.argmax(-1).tolist()
    assert sample(logits, GREEDY, _seeds(8, 1)) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=1.5, top_k=1),
    SamplingConfig(temperature=1.5, top_p=1e-6),
    SamplingConfig(temperature=1.5, top_k=5, top_p=1e-6),
])
def test_cuts_to_one_token_equal_greedy(config: SamplingConfig) -> None:
    logits = _logits()
    assert sample(logits, config, _seeds(8, 1)) == logits.argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = _logits(rows=6)
    configs = [GREEDY, WARM, GREEDY, SamplingConfig(temperature=0.7, top_k=3), GREEDY, WARM]
    tokens = sample(logits, configs, _seeds(6, 2))
    argmax = logits.argmax(-1).tolist()
    for row in (0, 2, 4):
        assert tokens[row] == argmax[row]
    assert tokens[3] in logits[3].topk(3).indices.tolist()


@pytest.mark.parametrize("config", [
    WARM,
    SamplingConfig(temperature=0.8, top_k=50),
    SamplingConfig(temperature=1.2, top_p=0.9),
    SamplingConfig(temperature=1.0, top_k=20, top_p=0.5),
])
def test_same_seed_same_tokens(config: SamplingConfig) -> None:
    steps = [_logits(seed=s) for s in range(5)]  # one "run" is a sequence of logits
    first, second = Sampler(7), Sampler(7)
    keys = [[(i, position) for i in range(8)] for position in range(5)]
    assert ([first(x, config, k) for x, k in zip(steps, keys, strict=True)]
            == [second(x, config, k) for x, k in zip(steps, keys, strict=True)])


def test_different_seeds_differ_on_a_flat_distribution() -> None:
    flat = torch.zeros(16, VOCAB)
    assert sample(flat, WARM, _seeds(16, 1)) != sample(flat, WARM, _seeds(16, 2))


def _counts(probs: torch.Tensor, config: SamplingConfig, draws: int = 4000) -> torch.Tensor:
    """Histogram of tokens drawn from one fixed distribution, `draws` rows in one batch."""
    logits = probs.log().expand(draws, -1).contiguous()  # (draws, V)
    tokens = sample(logits, config, _seeds(draws, 3))
    return torch.bincount(torch.tensor(tokens), minlength=probs.numel())


# A fixed distribution over 8 tokens; sorted by probability the order is 3, 0, 6, 1, 5, 2, 7, 4.
PROBS = torch.tensor([0.20, 0.10, 0.06, 0.30, 0.02, 0.08, 0.19, 0.05])


def test_top_k_never_leaks_and_keeps_relative_odds() -> None:
    counts = _counts(PROBS, SamplingConfig(temperature=1.0, top_k=3))
    assert set(counts.nonzero().flatten().tolist()) == {3, 0, 6}
    # Renormalised over the survivors: token 3 has 0.30 / 0.69 = 0.43 of the mass.
    assert counts[3] / counts.sum() == pytest.approx(0.30 / 0.69, abs=0.04)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # 0.30 + 0.20 = 0.50 < 0.6, so the nucleus needs token 6 too (0.69) and stops there.
    counts = _counts(PROBS, SamplingConfig(temperature=1.0, top_p=0.6))
    assert set(counts.nonzero().flatten().tolist()) == {3, 0, 6}


def test_top_k_and_top_p_together_apply_both_cuts() -> None:
    # top_k=4 leaves {3, 0, 6, 1} (mass 0.79); renormalised, 3 and 0 hold 0.63 < 0.7 -> add 6.
    counts = _counts(PROBS, SamplingConfig(temperature=1.0, top_k=4, top_p=0.7))
    assert set(counts.nonzero().flatten().tolist()) == {3, 0, 6}


def test_without_cuts_every_token_can_appear() -> None:
    counts = _counts(PROBS, WARM, draws=20000)
    assert (counts > 0).all()
    assert counts[3] / counts.sum() == pytest.approx(0.30, abs=0.02)


def test_rejects_a_config_count_that_does_not_match_the_rows() -> None:
    with pytest.raises(ValueError, match="2 sampling configs and 8 seeds for 8 rows"):
        sample(_logits(), [GREEDY, WARM], _seeds(8, 0))


def _wide(head: dict[int, float], vocab: int = 1000) -> torch.Tensor:
    """A distribution over a vocabulary wider than the top-p head: `head` ids carry their given
    mass and the rest is spread evenly over the other ids."""
    probs = torch.full((vocab,), (1 - sum(head.values())) / (vocab - len(head)))
    for token, mass in head.items():
        probs[token] = mass
    return probs


def test_top_p_on_a_wide_vocabulary_keeps_the_exact_nucleus() -> None:
    # Mass before each: 10 -> 0, 20 -> 0.4, 30 -> 0.7, 40 -> 0.9: top_p 0.8 keeps 10, 20, 30.
    probs = _wide({10: 0.4, 20: 0.3, 30: 0.2, 40: 0.05})
    counts = _counts(probs, SamplingConfig(temperature=1.0, top_p=0.8))
    assert set(counts.nonzero().flatten().tolist()) == {10, 20, 30}
    # Renormalised over the nucleus (0.9): token 10 holds 0.4 / 0.9 of the draws.
    assert counts[10] / counts.sum() == pytest.approx(0.4 / 0.9, abs=0.04)


def test_top_p_reaching_past_the_head_matches_a_full_sort() -> None:
    # A flat tail: the nucleus at 0.9 needs ~270 of the 300 tokens, more than the 256-token head.
    probs = _wide({7: 0.05}, vocab=300)
    counts = _counts(probs, SamplingConfig(temperature=1.0, top_p=0.9), draws=4000)
    # Each flat token has 0.95 / 299 of the mass; after token 7's 0.05, the 268th of them is the
    # last with less than 0.9 before it. Tied logits sort by id, so these are the lowest ids.
    flat_kept = [t for t in range(300) if t != 7][:268]
    assert set(counts.nonzero().flatten().tolist()) == {7, *flat_kept}


def test_rows_with_and_without_cuts_share_one_batch() -> None:
    probs = _wide({10: 0.4, 20: 0.3, 30: 0.2, 40: 0.05})
    logits = probs.log().expand(2000, -1).contiguous()
    configs = [SamplingConfig(temperature=1.0, top_p=0.8), WARM,
               SamplingConfig(temperature=1.0, top_k=500, top_p=0.8), GREEDY] * 500
    tokens = torch.tensor(sample(logits, configs, _seeds(2000, 4))).view(500, 4)
    assert set(tokens[:, 0].tolist()) == {10, 20, 30}
    assert len(set(tokens[:, 1].tolist())) > 10  # no cut: the 0.05 flat tail shows up
    assert set(tokens[:, 2].tolist()) == {10, 20, 30}
    assert set(tokens[:, 3].tolist()) == {10}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), top_k=st.integers(0, 400),
       top_p=st.floats(0.01, 1.0), temperature=st.floats(0.05, 3.0))
def test_tokens_always_lie_inside_the_top_k(seed: int, top_k: int, top_p: float,
                                             temperature: float) -> None:
    logits = _logits(rows=4, seed=seed)  # vocab 1000: head, top-k and full-sort paths all run
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = sample(logits, config, _seeds(4, seed))
    allowed = logits.topk(top_k or VOCAB, dim=-1).indices
    assert all(t in allowed[row].tolist() for row, t in enumerate(tokens))


def test_a_row_draws_the_same_token_in_any_batch() -> None:
    """A row's token depends on its seed and logits only: not on its neighbours or its place."""
    logits, seeds = _logits(rows=8, seed=5), _seeds(8, 9)
    config = SamplingConfig(temperature=1.0, top_p=0.9)
    together = sample(logits, config, seeds)
    alone = [sample(logits[i:i + 1], config, [seeds[i]])[0] for i in range(8)]
    order = [5, 2, 7, 0, 1, 6, 3, 4]
    shuffled = sample(logits[order], config, [seeds[i] for i in order])
    assert together == alone == [shuffled[order.index(i)] for i in range(8)]


def test_draws_survive_last_bit_noise_in_the_logits() -> None:
    """Logits a recompute or another batch size changes in the last bits keep their token: the
    race is keyed by token id, so near-equal logits swapping places in a sort change nothing."""
    flat = torch.randn(64, 49152, generator=_generator(0)) * 0.05  # a random model's flat logits
    noisy = flat + torch.randn(flat.shape, generator=_generator(1)) * 1e-6
    for config in (SamplingConfig(temperature=0.8, top_p=0.95), WARM,
                   SamplingConfig(temperature=0.8, top_k=40)):
        seeds = _seeds(64, 3)
        same = sum(a == b for a, b in zip(sample(flat, config, seeds),
                                          sample(noisy, config, seeds), strict=True))
        assert same == 64, config


def test_row_seeds_differ_for_nearby_ids_and_positions() -> None:
    seeds = {row_seed(s, r, p) for s in range(3) for r in range(30) for p in range(30)}
    assert len(seeds) == 3 * 30 * 30 and all(0 <= x < 2**64 for x in seeds)


def _fmix32(x: int) -> int:
    """murmur3's finaliser in plain Python: the reference the int32 tensor version must match."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_token_hash_matches_its_reference() -> None:
    """Draws depend on int32 products wrapping modulo 2^32; this pins the hash bit for bit."""
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF, 49151]
    lanes = torch.tensor([v - 2**32 if v >= 2**31 else v for v in values], dtype=torch.int32)
    _mix32_(lanes)
    assert [v & 0xFFFFFFFF for v in lanes.tolist()] == [_fmix32(v) for v in values]
