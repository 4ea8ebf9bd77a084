"""Quantized latent caches: FP8 as FlashMLA stores it, and INT8 in the same layout.

Per token: c_kv as 8-bit values in tiles of `latent_tile(R)` (128 for DeepSeek: 4 tiles of
512) with one fp32 scale per tile, symmetric (scale = max |x| / 448 for e4m3, / 127 for int8),
and the RoPE key k_pe in bf16, because rotated keys carry the position and lose most from
rounding. DeepSeek-V2: 512 + 4 * 4 + 64 * 2 = 656 bytes per token per layer.

Each token is quantized when it is written: its scales depend on its own values only, so no
block-wide statistics and no full-precision residual are needed (the KIVI formats of
quantized.py need both). Reads dequantize the gathered blocks, then attend like the float
latent (mla.py); a prefill chunk uses its own entries as computed.
"""

from __future__ import annotations

import torch

from engine.attention.mla import MLAAttention
from engine.kv_cache.spec import latent_tile
from engine.kv_cache.storage import LayerCache

FP8 = torch.float8_e4m3fn
LIMITS = {"fp8": torch.finfo(FP8).max, "int8": 127.0}


def quantize_latent(c_kv: torch.Tensor, kv_dtype: str, tile: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """c_kv (T, R) -> values (T, R) in fp8 or int8, scales (T, R / tile) fp32."""
    t, r = c_kv.shape
    tiles = c_kv.float().view(t, r // tile, tile)  # (T, R/tile, tile)
    scale = tiles.abs().amax(dim=-1) / LIMITS[kv_dtype]  # (T, R/tile)
    scaled = tiles / scale.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    if kv_dtype == "fp8":
        values = scaled.to(FP8)
    else:
        values = scaled.round().clamp(-127, 127).to(torch.int8)
    return values.view(t, r), scale


def dequantize_latent(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
                      ) -> torch.Tensor:
    """Inverse of `quantize_latent` -> (T, R) in `dtype`."""
    t, r = values.shape
    tiles = values.float().view(t, scale.shape[-1], -1) * scale.unsqueeze(-1)
    return tiles.view(t, r).to(dtype)


class QuantizedMLAAttention(MLAAttention):
    """fp8 / int8 latents; the paths, masks and path rule are the float backend's."""

    name = "torch-mla-quantized"

    def __init__(self, spec, scale, workspace=None, path: str = "auto") -> None:
        super().__init__(spec, scale, workspace, path)
        self.tile = latent_tile(self.rank)

    @staticmethod
    def _rows(store: torch.Tensor) -> torch.Tensor:
        """(1, pages, bs, X) -> (pages * bs, X) slot rows, as bytes for fp8 (CPU torch has no
        fp8 index_copy / index_select)."""
        flat = store.view(-1, store.shape[-1])
        return flat.view(torch.uint8) if flat.dtype == FP8 else flat

    def write(self, cache: LayerCache, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        values, scale = quantize_latent(latent[:, :self.rank], self.spec.kv_dtype, self.tile)
        if values.dtype == FP8:
            values = values.view(torch.uint8)
        self._rows(cache["latent"]).index_copy_(0, slot_mapping, values)
        self._rows(cache["latent_scale"]).index_copy_(0, slot_mapping, scale)
        self._rows(cache["rope"]).index_copy_(0, slot_mapping,
                                              latent[:, self.rank:].to(torch.bfloat16))

    def read_blocks(self, cache: LayerCache, block_ids: torch.Tensor, dtype: torch.dtype
                    ) -> torch.Tensor:
        bs = self.spec.block_size
        slots = (block_ids[:, None] * bs + torch.arange(bs, device=block_ids.device)).reshape(-1)
        values = self._rows(cache["latent"]).index_select(0, slots)  # (n * bs, R)
        if cache["latent"].dtype == FP8:
            values = values.view(FP8)
        scale = self._rows(cache["latent_scale"]).index_select(0, slots)  # (n * bs, R/tile)
        rope = self._rows(cache["rope"]).index_select(0, slots)  # (n * bs, rope)
        return torch.cat((dequantize_latent(values, scale, dtype), rope.to(dtype)), dim=-1)
