"""Selective retention policies: what a layer group keeps of each request's KV cache.

    full                   everything (the default)
    window(sink, recent)   StreamingLLM: the first `sink` and the last `recent` tokens; a block
                           wholly outside both is given back at once
    h2o(heavy, recent)     Heavy-Hitter Oracle, by block: the last `recent` tokens, and up to
                           `heavy` tokens' worth of older blocks with the most accumulated
                           attention; past that, the older block with the least goes
    snapkv(budget, window) SnapKV: when the prompt is done, its last `window` tokens vote
                           (pooled attention) for prompt blocks; the top ones within `budget`
                           tokens stay, with the window itself; decode adds blocks freely
    pyramid(total=T, beta=20, window=32)
                           PyramidKV: SnapKV with a budget per layer that falls linearly with
                           depth (from 2T/L - T/(beta L) at the first layer to T/(beta L) at the
                           last), summing to `total` tokens over the L layers it covers

Everything works at block granularity: a block goes only when all of its tokens may go, so a
group keeps a little more than the policy's token count (at most a block at each edge).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAMES = ("full", "window", "h2o", "snapkv", "pyramid")
SYNTAX = ("full | window(sink, recent) | h2o(heavy, recent) | snapkv(budget, window) | "
          "pyramid(total=T, beta=20, window=32)")
# Why a policy gave a block back: the trace's `drop` events carry it.
DROP_REASONS = {"window": "out of window", "h2o": "lowest mass", "snapkv": "not selected"}


class RetentionError(ValueError):
    """A policy name or its arguments are wrong; the message says which and shows the syntax."""


@dataclass(frozen=True, slots=True)
class Retention:
    """One group's policy, parsed. Token counts are tokens, not blocks."""

    name: str = "full"
    sink: int = 0  # window
    recent: int = 0  # window, h2o
    heavy: int = 0  # h2o
    budget: int = 0  # snapkv: prompt tokens kept besides the observation window
    window: int = 0  # snapkv: the observation window

    @property
    def needs_attention(self) -> bool:
        """Whether the policy decides from attention scores (so attention must report them)."""
        return self.name in ("h2o", "snapkv")

    @property
    def allows_prefix_hits(self) -> bool:
        """Full and window groups can share cached blocks, as vLLM's sliding window does; a
        scored selection depends on the whole prompt's attention, so it cannot."""
        return self.name in ("full", "window")

    @property
    def reason(self) -> str:
        return DROP_REASONS.get(self.name, "")

    def __str__(self) -> str:
        args = {"window": (self.sink, self.recent), "h2o": (self.heavy, self.recent),
                "snapkv": (self.budget, self.window)}.get(self.name)
        return self.name if args is None else f"{self.name}({args[0]},{args[1]})"


_CALL = re.compile(r"^\s*([a-z_0-9]+)\s*(?:\((.*)\))?\s*$")


def parse_call(text: str) -> tuple[str, list[int], dict[str, float]]:
    """'name(1, 2, k=3)' -> ('name', [1, 2], {'k': 3.0})."""
    m = _CALL.match(text)
    if m is None:
        raise RetentionError(f"cannot read {text!r}; write {SYNTAX}")
    name, inner = m.group(1), (m.group(2) or "").strip()
    positional, keywords = [], {}
    for arg in filter(None, (a.strip() for a in inner.split(","))):
        key, eq, value = arg.partition("=")
        try:
            number = float(value if eq else key)
        except ValueError:
            raise RetentionError(f"{name}: {arg!r} is not a number; write {SYNTAX}") from None
        if eq:
            keywords[key.strip()] = number
        elif keywords:
            raise RetentionError(f"{name}: a positional argument after a keyword; {SYNTAX}")
        else:
            positional.append(int(number))
    return name, positional, keywords


def parse_retention(text: str) -> Retention:
    """One group's policy (not pyramid, which layout.py expands into per-layer snapkv)."""
    name, args, keywords = parse_call(text)
    if name not in NAMES or name == "pyramid":
        raise RetentionError(f"unknown policy {name!r}; choose {SYNTAX}")
    expected = {"full": 0, "window": 2, "h2o": 2, "snapkv": 2}[name]
    if len(args) != expected or keywords:
        raise RetentionError(f"{name} takes {expected} whole-number arguments, got "
                             f"{text.strip()!r}; write {SYNTAX}")
    if any(a < 0 for a in args) or (name != "full" and args[1] < 1):
        raise RetentionError(f"{name}: the token counts must be >= 0 and the second >= 1, got "
                             f"{args}")
    if name == "window":
        return Retention(name, sink=args[0], recent=args[1])
    if name == "h2o":
        return Retention(name, heavy=args[0], recent=args[1])
    if name == "snapkv":
        return Retention(name, budget=args[0], window=args[1])
    return Retention()


def pyramid_budgets(text: str, num_layers: int) -> list[int]:
    """Per-layer SnapKV budgets of `pyramid(total=T, beta=B, window=W)` over `num_layers`
    consecutive layers (PyramidKV: linear in depth, the last layer gets T/(B L))."""
    name, args, keywords = parse_call(text)
    unknown = set(keywords) - {"total", "beta", "window"}
    if name != "pyramid" or args or unknown or "total" not in keywords:
        raise RetentionError(f"write pyramid(total=T, beta=20, window=32), got {text.strip()!r}")
    total, beta = keywords["total"], keywords.get("beta", 20.0)
    if total < num_layers or beta < 1:
        raise RetentionError(f"pyramid: total={total:g} must be at least one token per layer "
                             f"({num_layers}) and beta >= 1")
    mean = total / num_layers
    low = mean / beta
    high = 2 * mean - low
    if num_layers == 1:
        return [int(round(mean))]
    return [max(1, int(round(high - (high - low) * i / (num_layers - 1))))
            for i in range(num_layers)]


def pyramid_window(text: str) -> int:
    _, _, keywords = parse_call(text)
    return int(keywords.get("window", 32))


def max_blocks_per_request(retention: Retention, max_model_len: int, block_size: int,
                           max_batched_tokens: int) -> int:
    """The most blocks one request can hold in a group at once: everything for full and
    SnapKV (the whole prompt is held until it is scored); for a window or H2O, what the policy
    keeps plus one step's chunk (given back after the step) and a block at each edge."""
    full = -(-max_model_len // block_size)
    kept = {"window": retention.sink + retention.recent,
            "h2o": retention.heavy + retention.recent}.get(retention.name)
    if kept is None:
        return full
    return min(full, -(-kept // block_size) + -(-max_batched_tokens // block_size) + 2)
