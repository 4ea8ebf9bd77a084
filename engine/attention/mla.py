"""`MLAAttention`: the backend of latent (MLA) caches, chosen by `select_backend` for
`spec.attention == "latent"`.

The cache keeps one entry `[c_kv ; k_pe]` per token (tensor "latent", `(1, pages, bs, W)`);
writes go through the slot mapping like K/V. Reads gather the step's blocks into the
workspace, then attend by one of the two paths of mla_paged.py.

Which path (`path`): "absorbed" or "expanded" force one everywhere (the oracle tests run
both); "auto" (the default) decodes absorbed and picks per prefill chunk the path with fewer
multiply-adds (`cheaper_path`): a chunk of Tq queries over L context tokens costs

    expanded  L * R * H * (Dn + Dv)  +  Tq * L * H * (Dn + Dr + Dv)     (up-project the context)
    absorbed  Tq * H * R * (Dn + Dv) +  Tq * L * H * (2R + Hr * Dr)      (absorb per query)

With DeepSeek-V2's shapes (R 512, Dn = Dv = 128) a decode step (Tq = 1) is cheaper absorbed
from L = 2 on, a chunk that is its whole context (L = Tq) is cheaper expanded, and a chunk over
a long cached prefix is cheaper absorbed below ~170 queries; a small latent (a converted model
at rank 16) makes absorbing cheaper everywhere, and the rule follows. vLLM and SGLang expand
prefill for the same reason: prefill is compute bound and expanded attention has 192-wide
heads instead of 576-wide ones, while decode is bound by reading the cache, which the absorbed
path reads once for all heads, in its compact form.
"""

from __future__ import annotations

import torch

from engine.attention import mla_paged, paged
from engine.attention.metadata import AttentionMetadata
from engine.attention.mla_paged import LatentProjections
from engine.kv_cache.spec import KVCacheSpec
from engine.kv_cache.storage import LayerCache

MLA_PATHS = ("auto", "absorbed", "expanded")


def cheaper_path(num_queries: int, context_len: int, up: LatentProjections, rope_width: int
                 ) -> str:
    """The path with fewer multiply-adds for a chunk (the module docstring's formulas)."""
    h, r, dn, dv = up.num_heads, up.rank, up.nope_dim, up.v_dim
    dr = rope_width // up.num_rope_heads
    expanded = context_len * r * h * (dn + dv) + num_queries * context_len * h * (dn + dr + dv)
    absorbed = num_queries * h * r * (dn + dv) + num_queries * context_len * h * (2 * r
                                                                                  + rope_width)
    return "absorbed" if absorbed < expanded else "expanded"


class MLAAttention:
    """One layer's latent cache in a float format; the reference for the quantized latent."""

    name = "torch-mla"

    def __init__(self, spec: KVCacheSpec, scale: float,
                 workspace: paged.Workspace | None = None, path: str = "auto") -> None:
        if path not in MLA_PATHS:
            raise ValueError(f"MLA path {path!r} is not one of {MLA_PATHS}")
        self.spec = spec
        self.scale = scale
        self.workspace = workspace
        self.path = path
        self.rank = spec.latent_rank
        self.rope_width = spec.head_dim - spec.latent_rank

    # ---- storage (overridden by the quantized latent) -------------------------------------
    def write(self, cache: LayerCache, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store entries (T, W) at flat slots (T,)."""
        store = cache["latent"]  # (1, pages, bs, W)
        store.view(-1, store.shape[-1]).index_copy_(0, slot_mapping, latent.to(store.dtype))

    def read_blocks(self, cache: LayerCache, block_ids: torch.Tensor, dtype: torch.dtype
                    ) -> torch.Tensor:
        """Entries of blocks (n,) -> (n * bs, W) in `dtype` (a workspace view on the float
        path: consume it before the next read)."""
        store = cache["latent"]
        shape = (1, block_ids.shape[0], *store.shape[2:])
        out = (None if self.workspace is None else
               self.workspace.take("latent", shape, store.dtype, store.device))
        return paged.gather_blocks(store, block_ids, out)[0].to(dtype)

    # ---- retention policies that score blocks (engine/attention/scores.py) ----------------
    def score_keys(self, cache: LayerCache, tables: torch.Tensor, context_len: int,
                   tail_slot: int) -> torch.Tensor:
        """Entries of one block table (1, n) as one key head -> (1, 1, L, W): scored against
        the absorbed query, they give exactly the attention's scores."""
        return self.read_blocks(cache, tables[0], torch.float32)[None, None, :context_len]

    def score_query(self, q: torch.Tensor) -> torch.Tensor:
        return q  # already absorbed by Attention.forward_latent

    # ---- attention --------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, latent: torch.Tensor, up: LatentProjections,
                cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
        """All T tokens of a step: q (T, H, Dn + Dr) with RoPE applied, new entries (T, W)
        -> (T, H, Dv). Writes the entries first; prefill tokens come first in the step."""
        self.write(cache, latent, meta.slot_mapping)
        out = q.new_empty(q.shape[0], up.num_heads, up.v_dim)  # (T, H, Dv)
        start = 0
        for qlen, ctx_len, table in zip(meta.prefill_query_lens, meta.prefill_context_lens,
                                        meta.prefill_block_tables, strict=True):
            end = start + qlen
            out[start:end] = self._prefill(q[start:end], latent[start:end], up, cache, table,
                                           ctx_len)
            start = end
        if meta.num_decode_tokens:
            out[meta.num_prefill_tokens:] = self.decode(q[meta.num_prefill_tokens:], up, cache,
                                                        meta)
        return out

    def _prefill(self, q: torch.Tensor, new: torch.Tensor, up: LatentProjections,
                 cache: LayerCache, table: torch.Tensor, context_len: int) -> torch.Tensor:
        """One request's chunk over its context; the chunk's own entries are used as
        computed, earlier ones as cached (null blocks masked)."""
        tq = q.shape[0]
        if context_len == tq:  # no cached prefix: the chunk is the whole context
            ctx, mask = new, None
        else:
            ctx = self.read_blocks(cache, table, q.dtype)[:context_len].clone()  # (L, W)
            ctx[context_len - tq:] = new
            rows = torch.arange(context_len - tq, context_len, device=q.device)  # (Tq,)
            mask = torch.arange(context_len, device=q.device) <= rows[:, None]  # (Tq, L)
            present = (table != cache.null_block).repeat_interleave(self.spec.block_size)
            mask &= present[:context_len]
        path = self.path
        if path == "auto":
            path = cheaper_path(tq, context_len, up, self.rope_width)
        run = mla_paged.prefill_absorbed if path == "absorbed" else mla_paged.prefill_expanded
        return run(q, ctx, up, mask, self.scale)

    def decode(self, q: torch.Tensor, up: LatentProjections, cache: LayerCache,
               meta: AttentionMetadata) -> torch.Tensor:
        """One new token per request: q (B, H, Dn + Dr) -> (B, H, Dv). All requests in one
        batched matmul: per-request chunks (paged.py's cache-sized ones) measured 1-6x slower
        here, the M = H rows of one request being too few to keep the matmul busy."""
        tables = meta.decode_block_tables  # (B, n)
        if meta.decode_attn_bias is None:  # the group's first layer builds it for the others
            meta.decode_attn_bias = paged.decode_attn_bias(
                meta.decode_context_lens, tables, self.spec.block_size, cache.null_block,
                q.dtype)
        bias = meta.decode_attn_bias.squeeze(1)  # (B, 1, L)
        b, n = tables.shape
        ctx = self.read_blocks(cache, tables.reshape(-1), q.dtype)
        ctx = ctx.view(b, n * self.spec.block_size, -1)  # (B, L, W)
        if self.path == "expanded":
            return mla_paged.decode_expanded(q, ctx, bias, up, self.scale)  # (B, H, Dv)
        q_abs = mla_paged.absorb_query(q, up, self.scale)  # (B, H, W)
        out = mla_paged.decode_absorbed(q_abs, ctx, bias, self.rank)  # (B, H, R)
        return mla_paged.absorb_output(out.transpose(0, 1), up)  # (B, H, Dv)


def mla_backend(spec: KVCacheSpec, scale: float, workspace: paged.Workspace | None,
                path: str = "auto") -> MLAAttention:
    """The float latent backend, or the quantized one for fp8 / int8 latents."""
    if spec.quantized:
        from engine.attention.mla_quantized import QuantizedMLAAttention

        return QuantizedMLAAttention(spec, scale, workspace, path)
    return MLAAttention(spec, scale, workspace, path)
