"""Selective retention on SmolLM2 at (near) equal KV budgets, one table from one process: for
full, window (StreamingLLM), h2o, snapkv, pyramid and a DuoAttention-style head-group config,
the KV bytes per token the cache actually held when scoring ended, KL and top-1 against the
fp32 full cache on the bundled held set, and decode tokens/s (interleaved, median).

    python bench/retention.py [--json] [--context 2048] [--num-scored 256] [--budget 512]

`--budget` is the tokens each policy keeps per layer (of `--context`); the head-group config
keeps one KV head full and the others a window, so it holds more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_timing import decode_tokens_per_s  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.quality import evaluate_many, held_set, passage_tokens  # noqa: E402
from engine.run import load_model_for  # noqa: E402


def policies(budget: int, layers: int) -> dict[str, str]:
    half = budget // 2
    return {
        "full": "full",
        "window": f"window(4,{budget - 4})",
        "h2o": f"h2o({half},{half})",
        "snapkv": f"snapkv({budget - 32},32)",
        "pyramid": f"pyramid(total={budget * layers}, beta=20, window=32)",
        "head groups": f"0-{layers - 1}/h0:full; 0-{layers - 1}/h1-2:window(4,{budget - 4})",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--num-scored", type=int, default=256)
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=16)
    args = parser.parse_args()
    # fp32 weights, as the reference's: the figures are then the cache's cost alone
    loaded = load_model_for(RunConfig(model="smollm2", device="cpu", dtype="fp32"))
    passages = passage_tokens(held_set(args.passages), loaded.tokenizer, args.context)
    base = RunConfig(model="smollm2", device="cpu", dtype="fp32",
                     max_model_len=args.context + args.decode_steps + 1)
    named = {name: base.replace(policy=p) for name, p in
             policies(args.budget, loaded.config.num_layers).items()}
    results = evaluate_many(list(named.values()), loaded, passages, context=args.context,
                            num_scored=args.num_scored)
    speed = decode_tokens_per_s(named, loaded, passages, args.context, args.decode_steps)
    rows = []
    print(f"{args.passages} held-set passages, context {args.context}, last {args.num_scored} "
          f"scored each; budget {args.budget} tokens per layer; decode at batch "
          f"{args.passages}")
    print(f"{'policy':>12} {'bytes/token':>12} {'KL':>9} {'top-1':>8} {'ppl':>8} "
          f"{'decode tok/s':>13}  spec")
    for (name, config), r in zip(named.items(), results, strict=True):
        rows.append({"name": name, "policy": config.policy,
                     "kv_bytes_per_token": r.kv_bytes_per_token, "kl_mean": r.kl_mean,
                     "top1": r.top1, "ppl": r.ppl, "ppl_ref": r.ppl_ref,
                     "decode_tokens_per_s": speed[name]})
        print(f"{name:>12} {r.kv_bytes_per_token:>12,.1f} {r.kl_mean:>9.5f} "
              f"{100 * r.top1:>7.2f}% {r.ppl:>8.3f} {speed[name]:>13.1f}  {config.policy}")
    print(f"(fp32 full cache perplexity {results[0].ppl_ref:.3f})")
    if args.json:
        print(json.dumps({"bench": "retention", "context": args.context,
                          "budget": args.budget, "rows": rows}))


if __name__ == "__main__":
    main()
