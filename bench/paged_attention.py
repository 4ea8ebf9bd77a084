"""Decode attention through block tables vs SDPA on the same K/V stored contiguously.

    python bench/paged_attention.py [--json] [--device cpu|cuda] [--reps N] [--threads N]

SmolLM2 attention shapes (9 query heads, 3 KV heads, head dim 64), batch 8, context 2048, block
sizes 16 and 64 with shuffled block ids. Both paths run in one process, interleaved, and the
table reports medians (this machine's microbenchmarks drift +-30 % between runs). The paged time
includes the gather through the block tables; the per-step mask is built once per step for all
layers in the engine, so it is built outside the timed region here; the gather reuses the
scratch buffers the engine reuses across layers. Target: paged / contiguous
<= 1.25. With --json the last line is one JSON object with every ratio, its target and a verdict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attention.paged import Workspace, decode_attention, decode_attn_bias  # noqa: E402
from engine.device import resolve_device  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
TARGET = 1.25


def make_case(batch: int, context: int, block_size: int, device: torch.device, seed: int
              ) -> dict:
    """A head-major paged cache with shuffled block ids, and the same K/V made contiguous."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq + 1  # block 0 stays free, as in the engine
    shape = (KV_HEADS, num_blocks, block_size, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(device)
    v_cache = torch.randn(shape, generator=gen).to(device)
    ids = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = ids[: batch * blocks_per_seq].view(batch, blocks_per_seq).to(device)
    flat = tables.reshape(-1)
    # (Hk, B*n, bs, D) -> (B, Hk, L, D): what a contiguous per-request cache would hold
    k = k_cache[:, flat].view(KV_HEADS, batch, context, HEAD_DIM).transpose(0, 1).contiguous()
    v = v_cache[:, flat].view(KV_HEADS, batch, context, HEAD_DIM).transpose(0, 1).contiguous()
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen).to(device)
    lens = torch.full((batch,), context, dtype=torch.int64, device=device)
    bias = decode_attn_bias(lens, context, q.dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, bias=bias, k=k, v=v,
                workspace=Workspace())


def paged(c: dict) -> torch.Tensor:
    return decode_attention(c["q"], c["k_cache"], c["v_cache"], c["tables"], c["bias"],
                            HEAD_DIM**-0.5, c["workspace"])  # (B, H, D)


def contiguous(c: dict) -> torch.Tensor:
    out = F.scaled_dot_product_attention(c["q"].unsqueeze(2), c["k"], c["v"],
                                         scale=HEAD_DIM**-0.5, enable_gqa=True)  # (B, H, 1, D)
    return out.squeeze(2)


def time_interleaved(fns: dict, case: dict, reps: int, device: torch.device
                     ) -> dict[str, float]:
    """Median milliseconds per function, alternating them every repetition."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(3):  # warm up allocator, kernels and caches
        for fn in fns.values():
            fn(case)
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn(case)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = []
    with torch.inference_mode():
        for block_size in (16, 64):
            case = make_case(args.batch, args.context, block_size, device, seed=block_size)
            torch.testing.assert_close(paged(case), contiguous(case), atol=1e-4, rtol=1e-4)
            ms = time_interleaved({"paged": paged, "contiguous": contiguous}, case,
                                  args.reps, device)
            ratio = ms["paged"] / ms["contiguous"]
            results.append({"block_size": block_size, "paged_ms": round(ms["paged"], 3),
                            "contiguous_ms": round(ms["contiguous"], 3),
                            "ratio": round(ratio, 3), "target": f"<= {TARGET}",
                            "pass": ratio <= TARGET})
    print(f"decode attention, B={args.batch}, context {args.context}, {HEADS} q / {KV_HEADS} kv "
          f"heads, D={HEAD_DIM}, {device.type}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")
    print(f"{'block':>6} {'paged ms':>10} {'SDPA ms':>10} {'ratio':>7} {'target':>8}  ok")
    for r in results:
        print(f"{r['block_size']:>6} {r['paged_ms']:>10.3f} {r['contiguous_ms']:>10.3f} "
              f"{r['ratio']:>7.3f} {r['target']:>8}  {'yes' if r['pass'] else 'NO'}")
    if args.json:
        print(json.dumps({"bench": "paged_attention", "device": device.type,
                          "results": results, "pass": all(r["pass"] for r in results)}))


if __name__ == "__main__":
    main()
