"""Next-token sampling: greedy, temperature, top-k and top-p, vectorised over a batch of rows.

Randomness comes only from the `torch.Generator` the engine owns and passes in, so a run is
reproducible: the same seed and the same sequence of logits give the same tokens. The generator
must live on the logits' device (a CUDA generator for CUDA logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.config import SamplingConfig


def sample(
    logits: torch.Tensor,
    configs: SamplingConfig | Sequence[SamplingConfig],
    generator: torch.Generator,
) -> list[int]:
    """Pick one next token per row of `logits` (N, vocab).

    `configs` is one SamplingConfig for every row or one per row. Greedy rows (temperature 0)
    take the argmax and draw no random numbers, so the random stream depends only on the
    sampled rows; an all-greedy batch is one argmax and one host transfer.
    """
    num_rows = logits.shape[0]
    if isinstance(configs, SamplingConfig):
        configs = [configs] * num_rows
    if len(configs) != num_rows:
        raise ValueError(f"{len(configs)} sampling configs for {num_rows} rows of logits")
    sampled_rows = [i for i, c in enumerate(configs) if c.temperature > 0]
    if not sampled_rows:
        return logits.argmax(dim=-1).tolist()
    if len(sampled_rows) == num_rows:
        return _sample_rows(logits, configs, generator).tolist()
    tokens = logits.argmax(dim=-1)  # (N,)
    rows = torch.tensor(sampled_rows, device=logits.device)
    picked = _sample_rows(logits.index_select(0, rows), [configs[i] for i in sampled_rows],
                          generator)
    tokens[rows] = picked
    return tokens.tolist()


# Top-p usually keeps a few dozen tokens; looking at this many first avoids sorting the whole
# vocabulary whenever it suffices: for 8 rows of 49152 a full sort measured ~64 ms of CPU time
# (about a whole decode step), the 256-wide head path ~6 ms.
NUCLEUS_HEAD = 256


def _sample_rows(
    logits: torch.Tensor, configs: Sequence[SamplingConfig], generator: torch.Generator
) -> torch.Tensor:
    """Sample every row (all temperatures > 0); returns token ids (n,)."""
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([c.temperature for c in configs], device=device)
    scaled = logits.float() / temperature.unsqueeze(1)  # (n, V)
    top_k = [c.top_k if 0 < c.top_k < vocab else vocab for c in configs]
    top_p = [c.top_p for c in configs]
    if max(top_k) == vocab and min(top_p) >= 1.0:
        # No cut on any row: draw from the full distribution, no sorting.
        return _draw(torch.softmax(scaled, dim=-1), generator)

    values, indices = _sorted_head(scaled, top_k, top_p)  # (n, K), descending
    positions = torch.arange(values.shape[1], device=device)  # (K,)
    k = torch.tensor(top_k, device=device).unsqueeze(1)  # (n, 1)
    values = values.masked_fill(positions >= k, float("-inf"))
    # Probabilities over the whole top-k-limited row: a head shorter than a row's top-k holds
    # only part of its mass, so such rows normalise by the full row's logsumexp instead.
    log_norm = torch.where(k.squeeze(1) <= values.shape[1], values.logsumexp(dim=-1),
                           scaled.logsumexp(dim=-1))  # (n,)
    probs = (values - log_norm.unsqueeze(1)).exp()  # (n, K)

    p = torch.tensor(top_p, device=device, dtype=probs.dtype).unsqueeze(1)  # (n, 1)
    # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass
    # strictly before it already reaches top_p. The first token always survives, and rows with
    # top_p == 1 drop nothing even when float rounding pushes the running mass past 1.
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((mass_before >= p) & (p < 1.0), 0.0)
    choice = _draw(probs, generator)  # (n,)
    return indices.gather(1, choice.unsqueeze(1)).squeeze(1)


def _sorted_head(
    scaled: torch.Tensor, top_k: list[int], top_p: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest logits of each row, descending, with their ids: enough for every cut."""
    vocab = scaled.shape[-1]
    if max(top_k) < vocab:  # every row has a top-k: its k largest suffice
        return scaled.topk(max(top_k), dim=-1)
    if vocab > NUCLEUS_HEAD:
        values, indices = scaled.topk(NUCLEUS_HEAD, dim=-1)  # (n, H)
        head_mass = (values - scaled.logsumexp(dim=-1, keepdim=True)).exp().sum(dim=-1)
        # A row fits in the head when its top-k does, or when it has no top-k and the head
        # holds top_p of the mass: every later token then has top_p before it and is dropped.
        # (A top-k longer than the head would need the top-k's own mass: sort instead.)
        fits = [k <= NUCLEUS_HEAD or (k == vocab and p < 1.0 and mass >= p)
                for k, p, mass in zip(top_k, top_p, head_mass.tolist(), strict=True)]
        if all(fits):
            return values, indices
    # A stable sort keeps tied logits in id order, so a cut to one token agrees with argmax.
    return scaled.sort(dim=-1, descending=True, stable=True)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row, proportional to `probs` (n, K) (need not sum to 1).

    Inverse-CDF sampling: one uniform number per row, where multinomial costs several times
    more on a CPU. Dropped entries are 0 and add nothing to the running sum, so they are never
    picked; the clamp guards a uniform that rounds up to the total.
    """
    cdf = probs.cumsum(dim=-1)  # (n, K)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    last_kept = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.searchsorted(cdf, u, right=True).minimum(last_kept).squeeze(1)


class Sampler:
    """Binds the engine's generator so the step loop calls `sampler(logits, configs)`.

    The generator is the only state; the engine creates it from the run's seed and must not share
    it with anything else that draws random numbers, or runs stop being reproducible.
    """

    __slots__ = ("generator",)

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    @classmethod
    def from_seed(cls, seed: int, device: torch.device | str = "cpu") -> Sampler:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return cls(generator)

    def __call__(
        self, logits: torch.Tensor, configs: SamplingConfig | Sequence[SamplingConfig]
    ) -> list[int]:
        return sample(logits, configs, self.generator)
