"""`Attention`: one layer's paged attention, as the model calls it.

A layer's KV heads may be split over several cache groups (each with its own block tables and
policy); the object holds one `LayerCache` per group share and sends each share's query heads
to the backend with that share's metadata. With one group (the usual case) it is one call.
An MLA layer calls `forward_latent` instead: its cache has one entry per token, no KV heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.attention import scores
from engine.attention.backends import TorchPagedAttention
from engine.attention.metadata import AttentionMetadata
from engine.kv_cache.storage import LayerCache

if TYPE_CHECKING:
    from engine.attention.mla import MLAAttention
    from engine.attention.mla_paged import LatentProjections


class Attention:
    """Owns the layer's cache shares and its backend (chosen once); stateless between steps."""

    def __init__(self, layer: int, caches: list[LayerCache], num_heads: int, num_kv_heads: int,
                 backend: TorchPagedAttention | MLAAttention) -> None:
        covered = [h for c in caches for h in c.kv_heads]
        if covered != list(range(num_kv_heads)):
            raise ValueError(f"layer {layer}: cache shares cover KV heads {covered}, "
                             f"not 0-{num_kv_heads - 1}")
        self.layer = layer
        self.caches = caches
        self.group = num_heads // num_kv_heads  # query heads per KV head
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                metadata: list[AttentionMetadata]) -> torch.Tensor:
        """q (T, H, D), k/v (T, Hk, D) of the step's tokens -> (T, H, D); `metadata[g]` is
        group g's view of the step."""
        if len(self.caches) == 1:
            cache = self.caches[0]
            return self._share(q, k, v, cache, metadata[cache.group_id])
        out = torch.empty_like(q)  # (T, H, D)
        for cache in self.caches:
            heads = slice(cache.kv_heads.start, cache.kv_heads.stop)
            # query head j*G + g reads KV head j (the layout transformers' repeat_kv assumes)
            q_heads = slice(heads.start * self.group, heads.stop * self.group)
            out[:, q_heads] = self._share(q[:, q_heads], k[:, heads], v[:, heads], cache,
                                          metadata[cache.group_id])
        return out

    def _share(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
               meta: AttentionMetadata) -> torch.Tensor:
        out = self.backend.forward(q, k, v, cache, meta)
        if meta.mass_mode is not None:  # a policy that scores blocks (h2o, snapkv)
            scores.accumulate(q, cache, meta, self.backend, self.backend.scale)
        return out

    def forward_latent(self, q: torch.Tensor, latent: torch.Tensor, up: LatentProjections,
                       metadata: list[AttentionMetadata]) -> torch.Tensor:
        """MLA: q (T, H, Dn + Dr), the new cache entries (T, W) and the layer's up-projections
        -> (T, H, Dv). A latent cache has one entry per token, so one share per layer."""
        (cache,) = self.caches
        meta = metadata[cache.group_id]
        out = self.backend.forward(q, latent, up, cache, meta)
        if meta.mass_mode is not None:  # scored through the latent: the absorbed query
            from engine.attention.mla_paged import absorb_query

            scores.accumulate(absorb_query(q, up, 1.0), cache, meta, self.backend,
                              self.backend.scale)
        return out
