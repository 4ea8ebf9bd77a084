"""MLA decode: the absorbed path against the expanded one, and the cache each costs.

1. decode step time of the whole model (mla-lite: DeepSeek-V2-Lite attention, 4 layers; fp32
   on CPU, bf16 on CUDA) at batch 8 for each context, absorbed and expanded steps interleaved
   on one cache filled with random latents (attention cost does not depend on the values);
   target: absorbed faster than expanded at 2048 and beyond; the crossover is the shortest
   context from which absorbed stays faster;
2. KV bytes per token (all layers) of MLA beside its MHA and GQA (4 KV heads) equivalents,
   from the formula and from an allocated cache (engine/models/mla_shapes.py);
3. the latent bytes the absorbed step reads (batch x context x 576 values x 4 layers) per
   second of its step, beside the device's measured copy bandwidth (engine/roofline.py): a
   lower bound on the achieved read rate, since the step also runs the weights.

    python bench/mla_decode.py [--json] [--contexts 32,128,512,2048,8192] [--batch 8]
        [--reps 3] [--device cpu|cuda] [--dtype fp32|bf16]

bench/gpu_check.sh runs it on CUDA in bf16 at batch 64, contexts up to 32768.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.kv_cache.storage import PagedKVCache  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.models.loader import load_model  # noqa: E402
from engine.models.mla_shapes import KINDS, SHAPES  # noqa: E402
from engine.roofline import bandwidth  # noqa: E402
from engine.sequence import Sequence  # noqa: E402

BLOCK = 16
PATHS = ("absorbed", "expanded")


def decode_batch(context: int, batch: int) -> tuple[list[tuple[Sequence, int]], int]:
    """`batch` requests that have `context` tokens cached and decode their next one; their
    blocks are shuffled over the pool, as a busy cache's would be."""
    per = context // BLOCK + 1
    ids = torch.randperm(batch * per, generator=torch.Generator().manual_seed(0)).tolist()
    seqs = []
    for i in range(batch):
        seq = Sequence(i, [1] * (context + 1), context, 1 << 20,
                       block_tables=(ids[i * per:(i + 1) * per],))
        seq.num_computed_tokens = context
        seqs.append((seq, 1))
    return seqs, batch * per


def time_steps(loaded, context: int, batch: int, reps: int, kv_dtype: str
               ) -> tuple[dict[str, float], int]:
    """Median seconds of one decode step per path, the paths interleaved, and the bytes of
    latent cache the step reads."""
    items, blocks = decode_batch(context, batch)
    cache = PagedKVCache.for_model(loaded.config, blocks, BLOCK, kv_dtype, loaded.device)
    gen = torch.Generator(loaded.device).manual_seed(1)
    for t in cache.storage.values():
        t.copy_(torch.randn(t.shape, generator=gen, device=loaded.device))
    latent_bytes = int(batch * context * cache.allocated_bytes_per_token)
    runners = {p: ModelRunner(loaded, cache, mla_path=p) for p in PATHS}
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(reps + 1):  # the first round warms up (workspace, allocator)
        for path in PATHS if rep % 2 == 0 else PATHS[::-1]:
            sync(loaded.device)
            start = time.perf_counter()
            runners[path].execute(items)
            sync(loaded.device)
            if rep:
                times[path].append(time.perf_counter() - start)
    return {p: statistics.median(v) for p, v in times.items()}, latent_bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def footprint() -> list[dict]:
    shape = SHAPES["mla-lite (this lab's preset)"]
    return [{"kind": k, "elements_per_token_per_layer": shape.elements(k),
             "formula_bytes_per_token_fp32": shape.formula_bytes(k, "fp32") * shape.num_layers,
             "measured_bytes_per_token_fp32": shape.measured_bytes(k, "fp32")
             * shape.num_layers,
             "measured_bytes_per_token_bf16": shape.measured_bytes(k, "bf16")
             * shape.num_layers} for k in KINDS]


def crossover(rows: list[dict]) -> int | None:
    """The shortest measured context from which absorbed is faster at every longer one."""
    best = None
    for row in reversed(rows):
        if row["absorbed_ms"] >= row["expanded_ms"]:
            break
        best = row["context"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    parser.add_argument("--contexts", default="32,128,512,2048,8192")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"),
                        help="weights and latent cache (default: fp32 on cpu, bf16 on cuda)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device; use --device cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    loaded = load_model("mla-lite", device, dtype)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    copy_bw = bandwidth(device)  # the figure the engine's roofline uses
    print(f"1. decode step, mla-lite ({loaded.config.num_layers} layers), batch {args.batch}, "
          f"{dtype_name}, {where}, median of {args.reps}, interleaved")
    print(f"{'context':>8} {'absorbed ms':>12} {'expanded ms':>12} {'expanded/absorbed':>18} "
          f"{'latent GB/s':>12}")
    rows = []
    with torch.inference_mode():
        for context in (int(c) for c in args.contexts.split(",")):
            t, latent_bytes = time_steps(loaded, context, args.batch, args.reps, dtype_name)
            row = {"context": context, "absorbed_ms": 1e3 * t["absorbed"],
                   "expanded_ms": 1e3 * t["expanded"],
                   "speedup": t["expanded"] / t["absorbed"],
                   "latent_bytes_read": latent_bytes,
                   "latent_read_bytes_per_s": latent_bytes / t["absorbed"]}
            rows.append(row)
            print(f"{context:>8} {row['absorbed_ms']:>12.1f} {row['expanded_ms']:>12.1f} "
                  f"{row['speedup']:>17.2f}x {row['latent_read_bytes_per_s'] / 1e9:>12.1f}",
                  flush=True)
    print(f"   copy bandwidth measured on this device: {copy_bw / 1e9:.1f} GB/s; the best "
          f"latent read reached {max(r['latent_read_bytes_per_s'] for r in rows) / copy_bw:.0%}"
          " of it")
    cross = crossover(rows)
    print(f"   crossover: absorbed is faster from context {cross} on (of those measured)")
    fp = footprint()
    print("\n2. KV bytes per token, all 4 layers (formula = measured from an allocated cache)")
    for r in fp:
        print(f"{r['kind']:>4} {r['elements_per_token_per_layer']:>6} values/layer "
              f"{r['measured_bytes_per_token_fp32']:>9,.0f} B fp32 "
              f"{r['measured_bytes_per_token_bf16']:>9,.0f} B bf16")
    checks = {"absorbed_faster_from_2048": all(r["speedup"] > 1 for r in rows
                                               if r["context"] >= 2048),
              "formula_equals_allocated": all(r["formula_bytes_per_token_fp32"]
                                              == r["measured_bytes_per_token_fp32"]
                                              for r in fp)}
    print("\nchecks: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in checks.items()))
    if args.json:
        print(json.dumps({"bench": "mla_decode", "device": where, "dtype": dtype_name,
                          "batch": args.batch, "threads": torch.get_num_threads(),
                          "copy_bytes_per_s": copy_bw, "decode": rows,
                          "crossover_context": cross, "kv_bytes": fp, "checks": checks}))


if __name__ == "__main__":
    main()
