"""Quantized KV blocks on SmolLM2, both sides of the trade in one process:

1. capacity: blocks one byte budget buys, vs bf16, per format and block size (from the specs:
   scales and minimums included); targets int8 >= 1.9x, int4 >= 3.5x, fp8 = 2.0x;
2. quality on the bundled held set against the fp32 full cache: mean KL and top-1 (targets:
   int8 KL <= 0.005 and top-1 >= 99 %; int4 KL <= 0.05 and top-1 >= 95 %; int4 with the
   Hadamard rotation below int4 without);
3. speed: decode tokens/s vs the fp32 cache at batch 8, context 2048, the formats' decode
   steps interleaved on caches prefilled with the same passages (target >= 0.8x).

    python bench/kv_quant.py [--json] [--context 2048] [--num-scored 256] [--passages 8]
                             [--device cpu|cuda] [--dtype fp32|bf16] [--decode-batch N]
                             [--decode-context N]

`--decode-batch`/`--decode-context` time decode at another shape than the quality passages
(bench/gpu_check.sh: batch 32, context 4096); the held set, joined and cut into windows of that
length, fills the batch (windows repeat when the batch is larger than the text).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_timing import decode_tokens_per_s  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.quality import evaluate_many, held_set, passage_tokens, split_text  # noqa: E402
from engine.run import load_model_for  # noqa: E402

TARGETS = {"int8": (1.9, 0.005, 0.99), "int4": (3.5, 0.05, 0.95), "fp8": (2.0, None, None)}
QUALITY = [("fp8", False), ("int8", False), ("int8", True), ("int4", False), ("int4", True)]


def capacity(block_sizes: tuple[int, ...]) -> list[dict]:
    rows = []
    for bs in block_sizes:
        page = {kv: RunConfig(kv_dtype=kv, block_size=bs, max_model_len=bs).kv_bytes_per_block
                for kv in ("bf16", "fp8", "int8", "int4")}
        rows.append({"block_size": bs, "bf16_page_bytes": page["bf16"],
                     **{f"{kv}_vs_bf16": round(page["bf16"] / page[kv], 3)
                        for kv in ("fp8", "int8", "int4")}})
    return rows


def quality(loaded, passages, args) -> list[dict]:
    base = RunConfig(model="smollm2", device=args.device, dtype=args.dtype,
                     max_model_len=args.context + 1)
    configs = [base.replace(kv_dtype=kv, kv_rotate=rot) for kv, rot in QUALITY]
    results = evaluate_many(configs, loaded, passages, context=args.context,
                            num_scored=args.num_scored)
    return [{"kv_dtype": r.kv_dtype, "kv_rotate": r.kv_rotate, "kl_mean": r.kl_mean,
             "top1": r.top1, "ppl": r.ppl, "ppl_ref": r.ppl_ref,
             "kv_bytes_per_token": r.kv_bytes_per_token,
             "num_tokens_scored": r.num_tokens_scored} for r in results]


def decode_passages(loaded, batch: int, context: int) -> list[list[int]]:
    windows = split_text("\n\n".join(held_set(None)), loaded.tokenizer, context, batch)
    return [windows[i % len(windows)] for i in range(batch)]


def decode_speed(loaded, passages, context: int, args) -> dict[str, float]:
    base = RunConfig(model="smollm2", device=args.device, dtype=args.dtype,
                     max_model_len=context + args.decode_steps + 1)
    configs = {kv: base.replace(kv_dtype=kv) for kv in ("fp32", "bf16", "fp8", "int8", "int4")}
    return decode_tokens_per_s(configs, loaded, passages, context, args.decode_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--num-scored", type=int, default=256)
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--decode-batch", type=int, help="default: --passages")
    parser.add_argument("--decode-context", type=int, help="default: --context")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="the weights' (fp32: the figures are the cache's cost alone)")
    args = parser.parse_args()
    loaded = load_model_for(RunConfig(model="smollm2", device=args.device, dtype=args.dtype))
    passages = passage_tokens(held_set(args.passages), loaded.tokenizer, args.context)
    decode_batch = args.decode_batch or args.passages
    decode_context = args.decode_context or args.context
    timed = (passages if (decode_batch, decode_context) == (args.passages, args.context)
             else decode_passages(loaded, decode_batch, decode_context))

    cap = capacity((16, 32, 64, 128))
    print("1. blocks one byte budget buys, vs bf16 (SmolLM2: 30 layers, 3 KV heads, D 64)")
    print(f"{'block':>6} {'fp8':>7} {'int8':>7} {'int4':>7}")
    for r in cap:
        print(f"{r['block_size']:>6} {r['fp8_vs_bf16']:>7.3f} {r['int8_vs_bf16']:>7.3f} "
              f"{r['int4_vs_bf16']:>7.3f}")
    print("   targets: int8 >= 1.9, int4 >= 3.5, fp8 = 2.0")

    qual = quality(loaded, passages, args)
    print(f"\n2. quality vs the fp32 full cache: {args.passages} held-set passages, context "
          f"{args.context}, last {args.num_scored} tokens scored each")
    print(f"{'cache':>16} {'KL':>9} {'top-1':>8} {'ppl':>8} {'ppl fp32':>9} {'bytes/tok':>10}")
    for r in qual:
        name = r["kv_dtype"] + (" + rotate" if r["kv_rotate"] else "")
        print(f"{name:>16} {r['kl_mean']:>9.5f} {100 * r['top1']:>7.2f}% {r['ppl']:>8.3f} "
              f"{r['ppl_ref']:>9.3f} {r['kv_bytes_per_token']:>10.1f}")

    speed = decode_speed(loaded, timed, decode_context, args)
    where = (f"{torch.get_num_threads()} threads" if args.device == "cpu"
             else torch.cuda.get_device_name())
    print(f"\n3. decode tokens/s at batch {decode_batch}, context {decode_context} "
          f"({where}, interleaved, median)")
    for kv, tps in speed.items():
        print(f"{kv:>6} {tps:8.1f} tok/s  {tps / speed['fp32']:.2f}x fp32")

    by = {(r["kv_dtype"], r["kv_rotate"]): r for r in qual}
    at128 = cap[-1]
    checks = {
        "int8_capacity": at128["int8_vs_bf16"] >= 1.9,
        "int4_capacity": at128["int4_vs_bf16"] >= 3.5,
        "fp8_capacity": abs(at128["fp8_vs_bf16"] - 2.0) < 0.005,
        "int8_quality": by["int8", False]["kl_mean"] <= 0.005 and by["int8", False]["top1"]
        >= 0.99,
        "int4_quality": by["int4", False]["kl_mean"] <= 0.05 and by["int4", False]["top1"]
        >= 0.95,
        "int4_rotation_helps": by["int4", True]["kl_mean"] < by["int4", False]["kl_mean"],
        "speed": all(speed[kv] >= 0.8 * speed["fp32"] for kv in ("fp8", "int8", "int4")),
    }
    print("\nchecks (capacity at block size 128): " + ", ".join(
        f"{k} {'ok' if v else 'MISSED'}" for k, v in checks.items()))
    if args.json:
        print(json.dumps({"bench": "kv_quant", "device": args.device, "capacity": cap,
                          "quality": qual, "decode_batch": decode_batch,
                          "decode_context": decode_context, "decode_tokens_per_s": speed,
                          "checks": checks}))


if __name__ == "__main__":
    main()
