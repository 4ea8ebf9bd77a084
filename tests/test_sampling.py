"""Sampling: greedy is argmax, cuts never leak, and the engine's generator makes runs repeat."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import SamplingConfig
from engine.sampling import Sampler, sample

VOCAB = 1000
GREEDY = SamplingConfig()
WARM = SamplingConfig(temperature=1.0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(rows: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=_generator(seed)) * 3  # (N, V)


def test_greedy_is_argmax_and_draws_no_random_numbers() -> None:
    logits = _logits()
    gen = _generator(0)
    state = gen.get_state()
    assert sample(logits, GREEDY, gen) == logits.argmax(-1).tolist()
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=1.5, top_k=1),
    SamplingConfig(temperature=1.5, top_p=1e-6),
    SamplingConfig(temperature=1.5, top_k=5, top_p=1e-6),
])
def test_cuts_to_one_token_equal_greedy(config: SamplingConfig) -> None:
    logits = _logits()
    assert sample(logits, config, _generator(1)) == logits.argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = _logits(rows=6)
    configs = [GREEDY, WARM, GREEDY, SamplingConfig(temperature=0.7, top_k=3), GREEDY, WARM]
    tokens = sample(logits, configs, _generator(2))
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
    first, second = Sampler.from_seed(7), Sampler.from_seed(7)
    assert [first(x, config) for x in steps] == [second(x, config) for x in steps]


def test_different_seeds_differ_on_a_flat_distribution() -> None:
    flat = torch.zeros(16, VOCAB)
    assert sample(flat, WARM, _generator(1)) != sample(flat, WARM, _generator(2))


def _counts(probs: torch.Tensor, config: SamplingConfig, draws: int = 4000) -> torch.Tensor:
    """Histogram of tokens drawn from one fixed distribution, `draws` rows in one batch."""
    logits = probs.log().expand(draws, -1).contiguous()  # (draws, V)
    tokens = sample(logits, config, _generator(3))
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
    with pytest.raises(ValueError, match="2 sampling configs for 8 rows"):
        sample(_logits(), [GREEDY, WARM], _generator(0))


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
    tokens = torch.tensor(sample(logits, configs, _generator(4))).view(500, 4)
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
    tokens = sample(logits, config, _generator(seed))
    allowed = logits.topk(top_k or VOCAB, dim=-1).indices
    assert all(t in allowed[row].tolist() for row, t in enumerate(tokens))
