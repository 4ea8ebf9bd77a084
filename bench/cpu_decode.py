"""The pieces of the CPU bf16 decode step, each against what it replaced, in one process: the
figures behind README's "The roofline gap on CPU".

1. All of SmolLM2's layer matmuls (120 weights) through the lab's kernel vs F.linear, at 1, 8,
   16 and 32 token rows (best of 5 passes each).
2. Batch-1 decode steps of the real engine with the weights on huge pages (as loaded) vs the
   same weights copied into PyTorch's own memory, interleaved (median step of each run).
3. The read bandwidth with one thread and with two, paired readings over `--seconds`: the two
   levels the stored roofline bound comes from.
4. With `--windows S`: S seconds of short batch-1 runs, each between two bandwidth readings;
   the median step of the runs whose readings were both above 45 GB/s vs the others.

    python bench/cpu_decode.py [--json] [--seconds 30] [--windows 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402, F401, I001 - before torch, as in cli.py: see engine/__init__.py
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.config import RunConfig, SamplingConfig, WorkloadSpec  # noqa: E402
from engine.cpu import linear  # noqa: E402
from engine.host_memory import empty_bytes  # noqa: E402
from engine.roofline import measure_bandwidth  # noqa: E402
from engine.run import load_model_for, run  # noqa: E402
from engine.trace import ListSink  # noqa: E402
from engine.workload import WorkloadRequest  # noqa: E402

FAST_GBS = 45.0  # readings above this are the "two memory links" level


def layer_weights(model) -> list[torch.Tensor]:
    return [w for layer in model.layers
            for w in (layer.attn.qkv_proj.weight, layer.attn.o_proj.weight,
                      layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)]


def matmul_ms(weights: list[torch.Tensor], rows: int) -> dict[str, float]:
    """Best-of-5 ms for one pass over every weight, kernel and F.linear."""
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]).bfloat16() for w in weights}
    out = {}
    with torch.inference_mode():
        for name, fn in (("kernel", linear.linear_bf16), ("f_linear", F.linear)):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for w in weights:
                    fn(xs[w.shape[1]], w)
                best = min(best, time.perf_counter() - start)
            out[name] = round(1000 * best, 2)
    return out


def decode_step_ms(config: RunConfig, loaded, tokens: int) -> float:
    """Median decode-only step of one batch-1 request, past the first two."""
    sink = ListSink()
    run(config, sink, model=loaded,
        requests=[WorkloadRequest(0, prompt_token_ids=[100] * 32, max_tokens=tokens)])
    steps = [s.duration_s for s in sink.steps if s.roofline_s is not None][2:]
    return 1000 * statistics.median(steps)


def huge_vs_plain(config: RunConfig, loaded, rounds: int = 4) -> dict[str, list[float]]:
    params = list({id(p): p for p in loaded.model.parameters()}.values())
    huge = [p.data for p in params]
    plain = [p.data.clone() for p in params]  # PyTorch's allocator: 4 KiB pages
    times: dict[str, list[float]] = {"huge_pages": [], "plain": []}
    try:
        for _ in range(rounds):
            for name, tensors in (("huge_pages", huge), ("plain", plain)):
                for p, t in zip(params, tensors, strict=True):
                    p.data = t
                times[name].append(round(decode_step_ms(config, loaded, 48), 2))
    finally:
        for p, t in zip(params, huge, strict=True):
            p.data = t
    return times


def read_levels(seconds: float) -> dict[str, float]:
    """Paired one- and two-thread reads of 256 MiB on huge pages, GB/s."""
    x = empty_bytes(256 << 20).view(torch.float32).fill_(1.0)
    threads = torch.get_num_threads()
    pairs = []
    try:
        end = time.time() + seconds
        while time.time() < end:
            pair = []
            for n in (1, 2):
                torch.set_num_threads(n)
                best = min(_timed(x.sum) for _ in range(3))
                pair.append(x.numel() * 4 / best / 1e9)
            pairs.append(pair)
            time.sleep(0.3)
    finally:
        torch.set_num_threads(threads)
    one, two = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"readings": len(pairs), "one_thread_median": round(statistics.median(one), 1),
            "one_thread_max": round(max(one), 1),
            "two_threads_median": round(statistics.median(two), 1),
            "two_threads_max": round(max(two), 1),
            "two_threads_above_45": sum(v > FAST_GBS for v in two)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def windows(config: RunConfig, loaded, seconds: float) -> dict[str, float]:
    device = torch.device("cpu")
    fast, usual = [], []
    end = time.time() + seconds
    while time.time() < end:
        before = measure_bandwidth(device, reps=2)
        step = decode_step_ms(config, loaded, 24)
        after = measure_bandwidth(device, reps=2)
        (fast if min(before, after) / 1e9 > FAST_GBS else usual).append(step)
    out = {"runs_fast": len(fast), "runs_usual": len(usual)}
    if fast:
        out |= {"fast_median_ms": round(statistics.median(fast), 2),
                "fast_min_ms": round(min(fast), 2)}
    if usual:
        out["usual_median_ms"] = round(statistics.median(usual), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    parser.add_argument("--seconds", type=float, default=30, help="of paired bandwidth reads")
    parser.add_argument("--windows", type=float, default=0,
                        help="seconds of decode runs between readings (0: skip)")
    args = parser.parse_args()
    if not linear.available():
        sys.exit("cpu_decode: this CPU has no AVX512-BF16 (or no gcc): the bf16 kernels do not "
                 "run here, so there is nothing to compare")
    config = RunConfig(model="smollm2", device="cpu", dtype="bf16", max_model_len=128,
                       num_blocks=64, sampling=SamplingConfig(ignore_eos=True),
                       workload=WorkloadSpec(kind="preset", name="prompts"))
    loaded = load_model_for(config)
    weights = layer_weights(loaded.model)
    result = {"bench": "cpu_decode",
              "matmul_ms": {rows: matmul_ms(weights, rows) for rows in (1, 8, 16, 32)},
              "step_ms": huge_vs_plain(config, loaded),
              "read_gbs": read_levels(args.seconds)}
    if args.windows:
        result["windows"] = windows(config, loaded, args.windows)
    print(f"SmolLM2's {len(weights)} layer matmuls, ms a pass (kernel vs F.linear):")
    for rows, ms in result["matmul_ms"].items():
        print(f"  {rows:>2} rows: {ms['kernel']:7.2f} vs {ms['f_linear']:7.2f}")
    steps = result["step_ms"]
    print(f"batch-1 decode step, ms (interleaved): huge pages {steps['huge_pages']}, "
          f"plain {steps['plain']}")
    print(f"read bandwidth, GB/s: {result['read_gbs']}")
    if "windows" in result:
        print(f"decode steps in and out of fast-memory windows: {result['windows']}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
