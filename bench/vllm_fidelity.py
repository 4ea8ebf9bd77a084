"""Does our block pool behave as vLLM's? Generated request streams through our KVCacheManager
and through vLLM 0.33.0's own KVCacheManager (the oracle in ../shared/tools/vllm_oracle),
compared request by request: prefix-hit tokens and evicted blocks. Target: 100 % equal hits,
equal evictions.

Both sides run the oracle's protocol: one request at a time; look up the prompt's prefix (at
most prompt_len - 1 tokens), allocate the rest of the prompt in one chunk, then K - 1 decode
steps of one token each (`--engine-steps`: the K-th sampled token is never written), free.
vLLM's `--num-blocks` includes its reserved null block, so it gets ours + 1. The hash
functions differ (vLLM: SHA-256 of pickled tokens; ours: Python's tuple hash), which does not
matter: both are keyed by content.

    python bench/vllm_fidelity.py [--json] [--oracle-dir DIR]

The oracle needs its own venv (`bash setup.sh` beside it, ~1 min the first time); it is too
heavy for CI, so unit tests pin the rules it checks (tests/test_block_pool.py).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import RunConfig  # noqa: E402
from engine.kv_cache import KVCacheManager  # noqa: E402

VOCAB = 49152


def make_stream(seed: int, num_requests: int) -> list[dict]:
    """Requests under shared system prompts, with repeats and multi-turn growth, so hits,
    misses, LRU eviction and re-hits after eviction all happen."""
    rng = random.Random(seed)
    systems = [[rng.randrange(VOCAB) for _ in range(rng.choice((48, 96, 160)))]
               for _ in range(3)]
    stream: list[dict] = []
    for _ in range(num_requests):
        roll = rng.random()
        if stream and roll < 0.15:  # the same request again
            stream.append(dict(rng.choice(stream)))
            continue
        if stream and roll < 0.3:  # a follow-up turn: an earlier prompt plus more
            base = rng.choice(stream)["prompt_token_ids"]
            prompt = base + [rng.randrange(VOCAB) for _ in range(rng.randint(5, 60))]
        else:
            prompt = rng.choice(systems) + [rng.randrange(VOCAB)
                                            for _ in range(rng.randint(1, 120))]
        stream.append({"prompt_token_ids": prompt, "output_len": rng.randint(1, 48)})
    return stream


def run_ours(stream: list[dict], block_size: int, num_blocks: int) -> list[dict]:
    config = RunConfig(model="tiny", block_size=block_size, num_blocks=num_blocks,
                       max_model_len=64)  # only the layout matters here
    kv = KVCacheManager(config.kv_groups(), num_blocks)
    out = []
    for i, r in enumerate(stream):
        tokens, k = list(r["prompt_token_ids"]), int(r["output_len"])
        rec = {"i": i, "hit_tokens": 0, "evicted_blocks": 0, "status": "ok"}
        out.append(rec)
        hits = kv.lookup_prefix(tokens, max_blocks=(len(tokens) - 1) // block_size)
        rec["hit_tokens"] = len(hits[0]) * block_size
        if not kv.allocate(i, len(tokens), hits if hits[0] else ()):
            rec["status"] = "prefill_alloc_failed"
        else:
            kv.cache_blocks(i, tokens, len(tokens))
            for step in range(k - 1):  # the K-th token is sampled, never written
                tokens.append((i * 7919 + step) % VOCAB)
                if not kv.allocate(i, len(tokens)):
                    rec["status"] = f"decode_alloc_failed@{step}"
                    break
                kv.cache_blocks(i, tokens, len(tokens))
        kv.free(i)
        rec["evicted_blocks"] = sum(e.kind == "evict" for e in kv.drain_events())
    return out


def run_oracle(python: str, script: Path, stream: list[dict], block_size: int,
               num_blocks: int) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(stream, f)
    done = subprocess.run([python, str(script), "--requests", f.name, "--block-size",
                           str(block_size), "--num-blocks", str(num_blocks + 1),
                           "--engine-steps"], capture_output=True, text=True, timeout=600)
    Path(f.name).unlink()
    if done.returncode != 0:
        raise SystemExit(f"the vLLM oracle failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)["requests"]


def oracle_python(oracle_dir: Path) -> str:
    setup = oracle_dir / "setup.sh"
    if not setup.is_file():
        raise SystemExit(f"no vLLM oracle at {oracle_dir}; pass --oracle-dir (the folder with "
                         "setup.sh and vllm_oracle.py)")
    done = subprocess.run(["bash", str(setup)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{setup} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    parser.add_argument("--oracle-dir", type=Path,
                        default=ROOT.parent / "shared" / "tools" / "vllm_oracle")
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    python = oracle_python(args.oracle_dir)
    script = args.oracle_dir / "vllm_oracle.py"
    rows = []
    print(f"{'seed':>4} {'block':>5} {'blocks':>6} {'requests':>8} {'equal hits':>10} "
          f"{'evictions ours':>14} {'vLLM':>6}  equal")
    for seed in (1, 2, 3):
        stream = make_stream(seed, args.requests)
        for block_size, num_blocks in ((16, 24), (16, 48), (8, 64), (32, 16)):
            ours = run_ours(stream, block_size, num_blocks)
            theirs = run_oracle(python, script, stream, block_size, num_blocks)
            same = sum(a["hit_tokens"] == b["hit_tokens"] and a["status"] == b["status"]
                       for a, b in zip(ours, theirs, strict=True))
            same_evictions = sum(a["evicted_blocks"] == b["evicted_blocks"]
                                 for a, b in zip(ours, theirs, strict=True))
            ev_ours = sum(r["evicted_blocks"] for r in ours)
            ev_vllm = sum(r["evicted_blocks"] for r in theirs)
            rows.append({"seed": seed, "block_size": block_size, "num_blocks": num_blocks,
                         "requests": len(stream), "equal_hits": same,
                         "hit_agreement": same / len(stream), "evictions_ours": ev_ours,
                         "evictions_vllm": ev_vllm,
                         "requests_with_equal_evictions": same_evictions,
                         "hit_tokens_ours": sum(r["hit_tokens"] for r in ours),
                         "hit_tokens_vllm": sum(r["hit_tokens"] for r in theirs)})
            print(f"{seed:>4} {block_size:>5} {num_blocks:>6} {len(stream):>8} "
                  f"{same:>5}/{len(stream):<4} {ev_ours:>14} {ev_vllm:>6}  "
                  f"{'yes' if same == same_evictions == len(stream) else 'NO'}")
    agreement = sum(r["equal_hits"] for r in rows) / sum(r["requests"] for r in rows)
    equal_evictions = all(r["evictions_ours"] == r["evictions_vllm"]
                          and r["requests_with_equal_evictions"] == r["requests"] for r in rows)
    print(f"hit agreement {100 * agreement:.1f} % over {len(rows)} streams; evictions "
          f"{'equal' if equal_evictions else 'DIFFER'}, request by request (target: 100 %, "
          "equal)")
    if args.json:
        print(json.dumps({"bench": "vllm_fidelity", "hit_agreement": agreement,
                          "equal_evictions": equal_evictions, "streams": rows,
                          "pass": agreement == 1.0 and equal_evictions}))


if __name__ == "__main__":
    main()
