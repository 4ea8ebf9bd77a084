"""Next-token sampling: greedy, temperature, top-k and top-p, vectorised over a batch of rows.

Every request has its own random stream, as with vLLM's per-request `seed`: the token a request
samples at output position k depends only on the run's seed, its request id, k and its own
logits. So a request's tokens do not depend on what it was batched with, on preemption (a
recomputed request continues at its next position; nothing has to survive in between) or on the
KV budget. The stream is a pure function, not a `torch.Generator` per request: a generator's
state would have to be kept across preemptions, and one generator call per row costs a dispatch
per row every step.

The draw is an exponential race (the Gumbel-max trick): token i wins when p_i / E_i is largest,
E_i ~ Exp(1), which picks i with probability p_i / sum(p). Each E_i is a hash of (row seed,
token id), so the draw is keyed by token ids, not by sorted positions: logits that differ in the
last bits (a recompute takes the prefill path; a bigger batch another matmul blocking) change a
token only when two candidates' scores tie to that precision. Inverse-CDF sampling over the
sorted nucleus flipped tokens there: near-equal logits swap places in the sort.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.config import SamplingConfig

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def sample(
    logits: torch.Tensor,
    configs: SamplingConfig | Sequence[SamplingConfig],
    seeds: Sequence[int],
) -> list[int]:
    """Pick one next token per row of `logits` (N, vocab).

    `configs` is one SamplingConfig for every row or one per row; `seeds` one 64-bit seed per
    row (see `row_seed`). Greedy rows (temperature 0) take the argmax and use no seed; an
    all-greedy batch is one argmax and one host transfer.
    """
    num_rows = logits.shape[0]
    if isinstance(configs, SamplingConfig):
        configs = [configs] * num_rows
    if len(configs) != num_rows or len(seeds) != num_rows:
        raise ValueError(f"{len(configs)} sampling configs and {len(seeds)} seeds for "
                         f"{num_rows} rows of logits")
    sampled_rows = [i for i, c in enumerate(configs) if c.temperature > 0]
    if not sampled_rows:
        return logits.argmax(dim=-1).tolist()
    if len(sampled_rows) == num_rows:
        return _sample_rows(logits, configs, seeds).tolist()
    tokens = logits.argmax(dim=-1)  # (N,)
    rows = torch.tensor(sampled_rows, device=logits.device)
    picked = _sample_rows(logits.index_select(0, rows), [configs[i] for i in sampled_rows],
                          [seeds[i] for i in sampled_rows])
    tokens[rows] = picked
    return tokens.tolist()


def row_seed(seed: int, request_id: int, position: int) -> int:
    """The seed of request `request_id`'s draw at output position `position` in a run seeded
    `seed`: splitmix64 chained over the three, so nearby ids and positions share nothing."""
    x = _splitmix64(seed & _M64)
    x = _splitmix64(x ^ (request_id & _M64))
    return _splitmix64(x ^ (position & _M64))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


# Top-p usually keeps a few dozen tokens; looking at this many first avoids sorting the whole
# vocabulary whenever it suffices: for 8 rows of 49152 a full sort measured ~64 ms of CPU time
# (about a whole decode step), the 256-wide head path ~6 ms.
NUCLEUS_HEAD = 256


def _sample_rows(
    logits: torch.Tensor, configs: Sequence[SamplingConfig], seeds: Sequence[int]
) -> torch.Tensor:
    """Sample every row (all temperatures > 0); returns token ids (n,)."""
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([c.temperature for c in configs], device=device)
    scaled = logits.float() / temperature.unsqueeze(1)  # (n, V)
    top_k = [c.top_k if 0 < c.top_k < vocab else vocab for c in configs]
    top_p = [c.top_p for c in configs]
    if min(top_k) == vocab and min(top_p) >= 1.0:
        # No cut on any row: race over the full distribution, no sorting. (min: one row
        # with a cut needs the cut path; `max` here once let a top-k row draw from everything.)
        ids = torch.arange(vocab, device=device).expand(len(configs), -1)  # (n, V)
        return _race(torch.softmax(scaled, dim=-1), ids, seeds)

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
    return _race(probs, indices, seeds)


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


def _race(probs: torch.Tensor, ids: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """The winning token id of each row: argmax of p / E with E ~ Exp(1) keyed by (seed, id).

    `probs` (n, K) need not sum to 1; dropped entries are 0 and never win (a row always keeps
    its first entry). `ids` (n, K) are the entries' token ids.
    """
    key = torch.tensor([(_int32(s), _int32(s >> 32)) for s in seeds], dtype=torch.int32,
                       device=ids.device)  # (n, 2): the seed's two 32-bit halves
    bits = ids.to(torch.int32) + key[:, :1]  # (n, K)
    _mix32_(bits)
    bits ^= key[:, 1:]
    _mix32_(bits)
    # The top 24 bits as a float32 in (0, 1), which float32 holds exactly: never log(0) or 1.
    bits = (bits >> 8) & 0xFFFFFF
    noise = bits.to(torch.float32).add_(0.5).mul_(2.0**-24).log_().neg_()  # Exp(1), (n, K)
    choice = (probs.float() / noise).argmax(dim=-1, keepdim=True)  # (n, 1)
    return ids.gather(1, choice).squeeze(1)


def _mix32_(x: torch.Tensor) -> None:
    """murmur3's 32-bit finaliser, in place, on int32 lanes.

    int32 products wrap modulo 2^32 on torch's backends (vectorised mullo on CPU, IMAD on
    CUDA), which is the arithmetic the hash wants; a logical shift is an arithmetic shift and a
    mask. int32 measured ~10x faster than int64 lanes on 8 rows of 49152 (a 64-bit multiply has
    no AVX2 instruction). tests/test_sampling.py pins the values to a pure-Python reference.
    """
    x ^= (x >> 16) & 0xFFFF
    x *= _int32(0x85EBCA6B)
    x ^= (x >> 13) & 0x7FFFF
    x *= _int32(0xC2B2AE35)
    x ^= (x >> 16) & 0xFFFF


def _int32(value: int) -> int:
    """The low 32 bits of `value` as a signed int32 (what torch.int32 holds)."""
    value &= _M32
    return value - 2**32 if value >= 2**31 else value


class Sampler:
    """The step loop's sampler: the run's seed, from which each request's stream follows.

    `keys` name each row's (request id, output position); a row's seed is `row_seed` of them.
    """

    __slots__ = ("seed",)

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(
        self, logits: torch.Tensor, configs: SamplingConfig | Sequence[SamplingConfig],
        keys: Sequence[tuple[int, int]],
    ) -> list[int]:
        seeds = [row_seed(self.seed, request_id, position) for request_id, position in keys]
        return sample(logits, configs, seeds)
