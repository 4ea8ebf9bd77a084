"""From a policy string to KV cache groups of equal shape.

A policy names, for rectangles of layers x KV heads, what the cache keeps there:

    full                                    every layer and head keeps its whole cache
    window(4,256)                           StreamingLLM on every layer
    0-14:full; 15-29:full                   two layer ranges (two groups of one spec)
    0:full; 1-28:window(4,256); 29:full     full first and last layers, a window elsewhere
    0-29/h0:full; 0-29/h1-2:window(4,128)   KV head ranges within the layers (DuoAttention)
    pyramid(total=3840, beta=20)            per-layer SnapKV budgets falling with depth

Every (layer, KV head) must be covered exactly once; the policies are those of retention.py.

Groups: one block id addresses one group's layers, and all groups draw from one pool, so every
group's block must cost the same bytes (vLLM makes page sizes equal the same way). Rather than
pad, regions are cut into groups of equal shape: gcd(layer counts) layers by gcd(head counts)
heads each. `0-9:a; 10-29:b` gives three groups of 10 layers; the price of odd splits (1 + 29
layers -> 30 one-layer groups) is more block tables and events, never wasted memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from engine.kv_cache.retention import (
    RetentionError,
    parse_retention,
    pyramid_budgets,
    pyramid_window,
)
from engine.kv_cache.spec import KVCacheGroup, KVCacheSpec


def example(num_layers: int, num_kv_heads: int) -> str:
    """A valid policy for this model's shape, quoted in every error message."""
    last, half = num_layers - 1, num_layers // 2
    span = lambda lo, hi: str(lo) if lo == hi else f"{lo}-{hi}"  # noqa: E731
    split = f"{span(0, half - 1)}:full; {span(half, last)}:full" if num_layers > 1 else "0:full"
    heads = (f"{span(0, last)}/h0:full; {span(0, last)}/h{span(1, num_kv_heads - 1)}:full"
             if num_kv_heads > 1 else "")
    return f"{split}   or   {heads}" if heads else split


class PolicyError(ValueError):
    """A policy string that cannot be used; the message gives the position and an example."""


@dataclass(frozen=True, slots=True)
class Region:
    layers: range
    kv_heads: range
    policy: str  # the policy as written, e.g. "full"

    @property
    def name(self) -> str:
        return self.policy.split("(", 1)[0]


_ITEM = re.compile(r"\s*(?:(?P<layers>\d+(?:-\d+)?)(?:/h(?P<heads>\d+(?:-\d+)?))?\s*:)?\s*"
                   r"(?P<policy>[a-z_0-9]+\s*(?:\([^()]*\))?)\s*$")


def _regions(layers: range, heads: range, policy: str) -> list[Region]:
    """One region, its policy normalised; a pyramid becomes one SnapKV region per layer."""
    if policy.strip().startswith("pyramid"):
        window = pyramid_window(policy)
        return [Region(range(layer, layer + 1), heads, f"snapkv({budget},{window})")
                for layer, budget in zip(layers, pyramid_budgets(policy, len(layers)),
                                         strict=True)]
    return [Region(layers, heads, str(parse_retention(policy)))]


def parse_policy(text: str, num_layers: int, num_kv_heads: int) -> list[Region]:
    """Regions covering every layer and KV head once, or a PolicyError saying where and why."""
    regions: list[Region] = []
    offset, hint = 0, example(num_layers, num_kv_heads)
    for part in (text or "full").split(";"):
        where = f"at character {offset + 1} ({part.strip()!r})"
        offset += len(part) + 1
        if not part.strip():
            continue
        m = _ITEM.match(part)
        if m is None:
            raise PolicyError(f"policy: cannot read {where}; write LAYERS[/hHEADS]:POLICY items "
                              f"separated by ';', e.g. {hint}")
        layers = _span(m["layers"], num_layers, "layer", where, hint)
        heads = _span(m["heads"], num_kv_heads, "KV head", where, hint)
        try:
            regions.extend(_regions(layers, heads, m["policy"]))
        except RetentionError as exc:
            raise PolicyError(f"policy: {where}: {exc}; e.g. {hint}") from None
    _check_cover(regions, num_layers, num_kv_heads, hint)
    return regions


def _span(text: str | None, count: int, what: str, where: str, hint: str) -> range:
    if text is None:
        return range(count)
    first, _, last = text.partition("-")
    lo, hi = int(first), int(last or first)
    if not 0 <= lo <= hi < count:
        raise PolicyError(f"policy: {what}s {text} {where} are outside 0-{count - 1}; "
                          f"e.g. {hint}")
    return range(lo, hi + 1)


def _check_cover(regions: list[Region], num_layers: int, num_kv_heads: int, hint: str) -> None:
    owner: dict[tuple[int, int], int] = {}
    for i, region in enumerate(regions):
        for layer in region.layers:
            for head in region.kv_heads:
                if (layer, head) in owner:
                    raise PolicyError(f"policy: layer {layer} KV head {head} is given twice "
                                      f"(items {owner[layer, head] + 1} and {i + 1}); e.g. "
                                      f"{hint}")
                owner[layer, head] = i
    missing = [(layer, h) for layer in range(num_layers) for h in range(num_kv_heads)
               if (layer, h) not in owner]
    if missing:
        layer, head = missing[0]
        raise PolicyError(f"policy: layer {layer} KV head {head} has no policy ({len(missing)} "
                          f"layer-head pairs uncovered); cover all {num_layers} layers and "
                          f"{num_kv_heads} KV heads, e.g. {hint}")


def make_groups(regions: list[Region], layer_spec: Callable[[int], KVCacheSpec]
                ) -> tuple[KVCacheGroup, ...]:
    """Cut the regions into groups of one shape (see the module docstring), numbered in order.
    `layer_spec(n)` is the model's spec of one layer's share of n KV heads."""
    per_layers = math.gcd(*(len(r.layers) for r in regions))
    per_heads = math.gcd(*(len(r.kv_heads) for r in regions))
    spec = layer_spec(per_heads)
    groups: list[KVCacheGroup] = []
    for region in regions:
        for lo in range(region.layers.start, region.layers.stop, per_layers):
            for h0 in range(region.kv_heads.start, region.kv_heads.stop, per_heads):
                groups.append(KVCacheGroup(len(groups), tuple(range(lo, lo + per_layers)),
                                           tuple(range(h0, h0 + per_heads)), spec,
                                           region.policy))
    return tuple(groups)
