"""MLA decode: the absorbed path against the expanded one, and the cache each costs.

1. decode step time of the whole model (mla-lite: DeepSeek-V2-Lite attention, 4 layers, fp32,
   CPU) at batch 8 for each context, absorbed and expanded steps interleaved on one cache
   filled with random latents (attention cost does not depend on the values), medians;
   target: absorbed faster than expanded at 2048 and beyond; the crossover is the shortest
   context from which absorbed stays faster;
2. KV bytes per token (all layers) of MLA beside its MHA and GQA (4 KV heads) equivalents,
   from the formula and from an allocated cache (engine/models/mla_shapes.py).

    python bench/mla_decode.py [--json] [--contexts 32,128,512,2048,8192] [--batch 8]
        [--reps 3]
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


def time_steps(loaded, context: int, batch: int, reps: int) -> dict[str, float]:
    """Median seconds of one decode step per path, the paths interleaved."""
    items, blocks = decode_batch(context, batch)
    cache = PagedKVCache.for_model(loaded.config, blocks, BLOCK, "fp32", loaded.device)
    gen = torch.Generator().manual_seed(1)
    for t in cache.storage.values():
        t.copy_(torch.randn(t.shape, generator=gen))
    runners = {p: ModelRunner(loaded, cache, mla_path=p) for p in PATHS}
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(reps + 1):  # the first round warms up (workspace, allocator)
        for path in PATHS if rep % 2 == 0 else PATHS[::-1]:
            start = time.perf_counter()
            runners[path].execute(items)
            if rep:
                times[path].append(time.perf_counter() - start)
    return {p: statistics.median(v) for p, v in times.items()}


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
    args = parser.parse_args()
    loaded = load_model("mla-lite", torch.device("cpu"), torch.float32)
    print(f"1. decode step, mla-lite ({loaded.config.num_layers} layers), batch {args.batch}, "
          f"fp32, {torch.get_num_threads()} threads, median of {args.reps}, interleaved")
    print(f"{'context':>8} {'absorbed ms':>12} {'expanded ms':>12} {'expanded/absorbed':>18}")
    rows = []
    with torch.inference_mode():
        for context in (int(c) for c in args.contexts.split(",")):
            t = time_steps(loaded, context, args.batch, args.reps)
            row = {"context": context, "absorbed_ms": 1e3 * t["absorbed"],
                   "expanded_ms": 1e3 * t["expanded"],
                   "speedup": t["expanded"] / t["absorbed"]}
            rows.append(row)
            print(f"{context:>8} {row['absorbed_ms']:>12.1f} {row['expanded_ms']:>12.1f} "
                  f"{row['speedup']:>17.2f}x", flush=True)
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
        print(json.dumps({"bench": "mla_decode", "batch": args.batch,
                          "threads": torch.get_num_threads(), "decode": rows,
                          "crossover_context": cross, "kv_bytes": fp, "checks": checks}))


if __name__ == "__main__":
    main()
