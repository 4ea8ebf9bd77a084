"""SmolLM2 converted to MLA: what each latent rank costs (the README's rank table).

For each (rank, RoPE dims) it runs `cli.py convert-mla` into a temporary folder and scores the
folder with `cli.py quality` against SmolLM2 itself (fp32 weights and cache on both sides, so
the figure is the conversion's error alone), then prints KL, top-1 agreement and the cached
values per token per layer beside SmolLM2's 384 (3 KV heads x 64 x K and V).

    python bench/mla_rank.py [--json] [--context 512] [--num-scored 32] [--passages 4]
                             [--points 16:16,64:16,128:16,256:16,336:16,192:64]

A point is RANK:ROPE_DIMS; at RoPE dims D the latent is lossless from rank 3 * (64 - D) + 192,
and only D = 64 (RoPE kept everywhere) with rank 192 reproduces SmolLM2 exactly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POINTS = "16:16,64:16,128:16,256:16,336:16,192:64"


def cli_json(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--json"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(rank: int, rope_dims: int, folder: Path, args) -> dict:
    converted = cli_json("convert-mla", "--rank", str(rank), "--rope-dims", str(rope_dims),
                         "--out", str(folder))
    quality = cli_json("quality", "--model", str(folder), "--dtype", "fp32",
                       "--context", str(args.context), "--num-scored", str(args.num_scored),
                       "--passages", str(args.passages), "--no-store")
    return {"rank": rank, "rope_dims": rope_dims,
            "kv_values_per_token_per_layer": converted["kv_values_per_token_per_layer"],
            "fraction_of_gqa": converted["fraction_of_gqa"],
            "kl_mean": quality["kl_mean"], "top1": quality["top1"], "ppl": quality["ppl"],
            "ppl_ref": quality["ppl_ref"], "num_tokens_scored": quality["num_tokens_scored"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--num-scored", type=int, default=32)
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--points", default=DEFAULT_POINTS, help="RANK:ROPE_DIMS,...")
    args = parser.parse_args()
    points = [tuple(int(v) for v in p.split(":")) for p in args.points.split(",")]

    print(f"SmolLM2 as MLA vs SmolLM2 (fp32): {args.passages} held-set passages, context "
          f"{args.context}, last {args.num_scored} tokens scored each")
    print(f"{'rank':>5} {'RoPE D':>6} {'values':>7} {'of GQA':>7} {'KL':>9} {'top-1':>7} "
          f"{'ppl':>9} {'ppl ref':>8}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvlab-mla-rank-") as tmp:
        for rank, rope_dims in points:
            r = measure(rank, rope_dims, Path(tmp) / f"r{rank}-d{rope_dims}", args)
            rows.append(r)
            print(f"{rank:>5} {rope_dims:>6} {r['kv_values_per_token_per_layer']:>7} "
                  f"{100 * r['fraction_of_gqa']:>6.1f}% {r['kl_mean']:>9.5f} "
                  f"{100 * r['top1']:>6.2f}% {r['ppl']:>9.3f} {r['ppl_ref']:>8.3f}", flush=True)
    if args.json:
        print(json.dumps({"bench": "mla_rank", "context": args.context,
                          "num_scored": args.num_scored, "passages": args.passages,
                          "results": rows}))


if __name__ == "__main__":
    main()
