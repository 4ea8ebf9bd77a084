"""End-to-end decode throughput: our engine vs transformers `generate()` on SmolLM2, greedy,
same prompts, one process.

(a) 8 requests x 128 new tokens: transformers as one left-padded batch of 8.
(b) 32 requests whose output lengths spread over 16..256 (shuffled): transformers in batches of 8,
    each batch running until its longest request is done (the "wasted" tokens are computed but
    not useful); our engine batches continuously with the same 8 sequence slots.
Both generate exactly the requested lengths (EOS ignored) so the useful work is identical, in
the same dtype (default: the engine's default for the device, bf16 where the CPU has bf16
instructions and on CUDA).

    python bench/e2e_decode.py [--json] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import RunConfig, SamplingConfig  # noqa: E402
from engine.device import dtype_name, resolve_device, torch_dtype  # noqa: E402
from engine.models.gguf_loader import gguf_path  # noqa: E402
from engine.models.loader import load_model  # noqa: E402
from engine.run import run  # noqa: E402
from engine.trace import ListSink  # noqa: E402
from engine.workload import WorkloadRequest, bundled_prompts  # noqa: E402

TARGETS = {"a_8x128": 1.0, "b_32_mixed": 1.5}


def load_transformers(device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=dtype)
    # No EOS: both sides generate exactly the requested lengths from the raw argmax
    # (min_new_tokens would instead suppress EOS and change the tokens).
    model.generation_config.eos_token_id = None
    return model.to(device).eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """One left-padded greedy batch; returns exactly `new_tokens` tokens per prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    device = model.device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    return [row[width:].tolist() for row in out.cpu()]


def engine_generate(loaded, prompts: list[list[int]], lengths: list[int]):
    requests = [WorkloadRequest(i, prompt_token_ids=p, max_tokens=n)
                for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    config = RunConfig(model="smollm2", device=str(loaded.device.type),
                       dtype=dtype_name(loaded.dtype), max_num_seqs=8,
                       max_num_batched_tokens=1024, max_model_len=2048,
                       sampling=SamplingConfig(ignore_eos=True))
    result = run(config, ListSink(), model=loaded, requests=requests)
    return [result.output_token_ids[i] for i in range(len(prompts))]


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def scenario(name, loaded, hf, prompts, lengths, pad_id):
    useful = sum(lengths)
    ours, ours_s = timed(lambda: engine_generate(loaded, prompts, lengths))
    hf_outputs, hf_s = [], 0.0
    for start in range(0, len(prompts), 8):
        batch, batch_lengths = prompts[start:start + 8], lengths[start:start + 8]
        longest = max(batch_lengths)  # a static batch runs until its longest request is done
        outs, seconds = timed(lambda b=batch, n=longest: hf_generate(hf, b, n, pad_id))
        hf_outputs += [o[:n] for o, n in zip(outs, batch_lengths, strict=True)]
        hf_s += seconds
    matching = sum(a == b for a, b in zip(ours, hf_outputs, strict=True))
    ratio = (useful / ours_s) / (useful / hf_s)
    return {
        "scenario": name, "useful_tokens": useful,
        "engine_tok_s": round(useful / ours_s, 1), "transformers_tok_s": round(useful / hf_s, 1),
        "ratio": round(ratio, 3), "target": f">= {TARGETS[name]}",
        "passes": ratio >= TARGETS[name], "requests_matching": f"{matching}/{len(prompts)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="both sides' dtype (auto: the engine's default for the device)")
    parser.add_argument("--quick", action="store_true", help="smaller (b) for a smoke run")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = resolve_device(args.device)
    dtype = torch_dtype(RunConfig(dtype=args.dtype).resolved_dtype(device.type))
    loaded = load_model("smollm2", device, dtype)
    hf = load_transformers(device, dtype)
    chats = [r.token_ids(loaded.tokenizer) for r in bundled_prompts()]
    pad_id = loaded.tokenizer.eos_token_id
    # one short request through each side first: first-call costs (the engine's memory profile
    # at start-up, oneDNN's kernel choice, the C kernel's build) are not decoding
    engine_generate(loaded, chats[:1], [2])
    hf_generate(hf, chats[:1], 2, pad_id)
    results = [scenario("a_8x128", loaded, hf, chats[:8], [128] * 8, pad_id)]
    num_b = 16 if args.quick else 32
    lengths = [round(16 + (256 - 16) * i / (num_b - 1)) for i in range(num_b)]
    random.Random(0).shuffle(lengths)
    prompts_b = [chats[i % len(chats)] for i in range(num_b)]
    results.append(scenario("b_32_mixed", loaded, hf, prompts_b, lengths, pad_id))
    for r in results:
        print(f"{r['scenario']:>12}: engine {r['engine_tok_s']:7.1f} tok/s  transformers "
              f"{r['transformers_tok_s']:7.1f} tok/s  ratio {r['ratio']:.2f} (target "
              f"{r['target']}, {'PASS' if r['passes'] else 'FAIL'})  tokens match "
              f"{r['requests_matching']}")
    if args.json:
        print(json.dumps({"bench": "e2e_decode", "device": str(device), "dtype": str(dtype),
                          "results": results}))


if __name__ == "__main__":
    main()
