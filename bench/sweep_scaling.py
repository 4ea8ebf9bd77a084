"""How sweeps scale on Ray, measured in one process on a local Ray of this machine's cores.

    .venv/bin/python bench/sweep_scaling.py [--rounds 5] [--cpus 2] [--with-2-threads] [--json]

1. Wall time of the same 8-point tiny-model sweep with 1 point at a time and with 2 at a time,
   one torch thread a point, interleaved (`--rounds` rounds, order rotating) after a warm-up
   sweep that starts the worker processes and loads their models. The ratio 2-at-once /
   1-at-once is the headline (target < 0.65 on two cores).
2. With --with-2-threads: the same 1-at-once sweep with 2 torch threads a point (what
   `execute` picks by default for max_parallel=1 on 2 CPUs), to show what intra-op threads buy
   or cost this model on a shared machine (slow: see README).
3. Ray's cost per point: the 1-at-once (1 thread) sweep's time per point minus the time per
   point of the same 8 configs run directly in this process (1 torch thread, the same SQLite
   store, models loaded beforehand), interleaved with the sweeps.
Every run is stored (SQLite in a temporary folder), as a sweep's runs always are. The machine's
load average is printed with the figures: a second worker only helps when a core is free, so on
a machine busy with other jobs the ratio tends to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.config import RunConfig, SamplingConfig, WorkloadSpec  # noqa: E402
from engine.run import load_model_for, run  # noqa: E402
from store import RunWriter, Store, open_store  # noqa: E402
from sweep import SweepSpec, create_sweep, execute, parse_axis, ray_setup  # noqa: E402

BASE = RunConfig(
    model="tiny", device="cpu", max_model_len=512, keyframe_interval=50,
    sampling=SamplingConfig(ignore_eos=True),
    workload=WorkloadSpec(kind="synthetic", num_requests=8, prompt_len_min=32,
                          prompt_len_max=96, output_len_min=96, output_len_max=96,
                          num_prefix_groups=2, shared_prefix_len=32),
)
AXES = ("block_size=8,16", "max_num_seqs=4,8", "seed=0,1")  # 8 points


def spec() -> SweepSpec:
    return SweepSpec(BASE, [parse_axis(a) for a in AXES])


def time_sweep(store: Store, parallel: int, threads: int) -> float:
    sweep_id = create_sweep(store, spec())
    start = time.perf_counter()
    result = execute(store, sweep_id, max_parallel=parallel, threads_per_point=threads)
    elapsed = time.perf_counter() - start
    assert result.progress.done == 8, result.to_dict()
    return elapsed


def time_direct(store: Store, threads: int) -> float:
    """The sweep's 8 configs run one after another in this process, traced the same way."""
    torch.set_num_threads(threads)
    configs = spec().point_configs()
    models = {c.seed: load_model_for(c) for c in configs}  # tiny's weights follow the seed
    start = time.perf_counter()
    for config in configs:
        writer = RunWriter(store, config)
        writer.close(summary=run(config, writer, model=models[config.seed]).summary)
    return time.perf_counter() - start


CASES = {"one": (1, 1), "two": (2, 1), "one_2_threads": (1, 2)}  # (parallel, threads)


def measure(rounds: int, cpus: int, with_2_threads: bool) -> dict:
    cases = [c for c in CASES if with_2_threads or c != "one_2_threads"]
    times: dict[str, list[float]] = {name: [] for name in (*cases, "direct")}
    load_before = os.getloadavg()[0]  # a second worker needs a free core: report the load
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/bench.db")
        start = time.perf_counter()
        ray_setup.connect(num_cpus=cpus)
        ray_start = time.perf_counter() - start
        cold = time_sweep(store, 2, 1)  # starts the workers and loads their models
        names = [*cases, "direct"]
        for i in range(rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate the order
                times[name].append(time_direct(store, 1) if name == "direct"
                                   else time_sweep(store, *CASES[name]))
        ray_setup.shutdown()
        store.dispose()
    m = {name: statistics.median(values) for name, values in times.items()}
    threads = {} if not with_2_threads else {
        "wall_1_at_once_2_threads_s": round(m["one_2_threads"], 2),
        "ratio_2_vs_1_with_2_threads": round(m["two"] / m["one_2_threads"], 3)}
    return {
        "points": 8, "cpus": cpus, "rounds": rounds, "ray_start_s": round(ray_start, 2),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cold_sweep_2_at_once_s": round(cold, 2),
        "wall_1_at_once_s": round(m["one"], 2), "wall_2_at_once_s": round(m["two"], 2),
        "ratio_2_vs_1": round(m["two"] / m["one"], 3), "target_ratio": "< 0.65",
        **threads,
        "per_point_direct_s": round(m["direct"] / 8, 3),
        "per_point_ray_1_at_once_s": round(m["one"] / 8, 3),
        "ray_overhead_per_point_s": round((m["one"] - m["direct"]) / 8, 3),
        "points_per_min_2_at_once": round(8 * 60 / m["two"], 1),
        "all_s": {name: [round(x, 2) for x in values] for name, values in times.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--with-2-threads", action="store_true",
                        help="also time 1 point at a time with 2 torch threads")
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs")
    parser.add_argument("--json", action="store_true", help="figures as JSON on the last line")
    args = parser.parse_args()
    f = measure(args.rounds, args.cpus, args.with_2_threads)
    print(f"load average (1 min) before/after: {f['load_avg_1min']} on {f['cpus']} CPUs")
    print(f"Ray start {f['ray_start_s']} s; cold 8-point sweep (2 at once, models loading) "
          f"{f['cold_sweep_2_at_once_s']} s")
    print(f"8-point tiny sweep, median of {f['rounds']}: 1 at once {f['wall_1_at_once_s']} s, "
          f"2 at once {f['wall_2_at_once_s']} s -> ratio {f['ratio_2_vs_1']} "
          f"(target {f['target_ratio']}); {f['points_per_min_2_at_once']} points/min")
    if "wall_1_at_once_2_threads_s" in f:
        print(f"1 at once with 2 torch threads: {f['wall_1_at_once_2_threads_s']} s -> ratio "
              f"{f['ratio_2_vs_1_with_2_threads']}")
    print(f"per point: direct {f['per_point_direct_s']} s, through Ray "
          f"{f['per_point_ray_1_at_once_s']} s -> Ray overhead "
          f"{f['ray_overhead_per_point_s']} s per point")
    if args.json:
        print(json.dumps(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
