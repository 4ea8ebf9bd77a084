"""The sweep CLI subcommands: sweep, sweeps, sweep-export (wired into cli.py).

    python cli.py sweep --base config.json --axis block_size=8,16,32 --axis kv_budget=4MiB,16MiB
        [--repeat N] [--sample N [--sample-seed S]] [--ray-address ADDR] [--max-parallel N]
        [--threads-per-point N] [--retries N] [--name NAME] [--dry-run] [--db URL] [--json]
    python cli.py sweep --resume SWEEP_ID [--db URL] ...     # runs only the missing points
    python cli.py sweeps [SWEEP_ID] [--json]                 # the sweeps, or one sweep's points
    python cli.py sweep-export SWEEP_ID FILE                 # one zip with every run

Bad input exits with status 2 and one line naming the problem and the fix; Ctrl-C stops the
sweep (finished points are kept) and exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from engine.config import ConfigError, RunConfig
from store import StoreError, open_store
from store.cli_commands import add_db_argument
from sweep.spec import (
    Axis,
    SweepError,
    SweepSpec,
    axis_field,
    load_base,
    parse_axis,
    point_label,
)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
SHOWN_COLUMNS = ("output_tokens_per_s", "prefix_hit_rate", "num_preemptions", "num_evictions")


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser("sweep", help="run a grid of configs as Ray tasks; every "
                                                "point is a stored run of the sweep")
    sweep.add_argument("--base", metavar="CONFIG", help="a RunConfig as JSON (a file, or the "
                       "JSON itself); fields left out take their defaults")
    sweep.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2,...",
                       help="a RunConfig field (or kv_budget, workload.X, sampling.X) and its "
                            "values; repeat the option for more axes")
    sweep.add_argument("--repeat", type=int, default=1, help="run every point N times")
    sweep.add_argument("--sample", type=int, help="run a random sample of N grid points")
    sweep.add_argument("--sample-seed", type=int, default=0)
    sweep.add_argument("--name", help="a name for the sweep")
    sweep.add_argument("--resume", type=int, metavar="SWEEP_ID",
                       help="run the points of an earlier sweep that have no finished run")
    sweep.add_argument("--ray-address", metavar="ADDR",
                       help="join this Ray cluster (default: start a local Ray)")
    sweep.add_argument("--max-parallel", type=int, help="points at once (default: Ray's CPUs)")
    sweep.add_argument("--threads-per-point", type=int, metavar="N",
                       help="CPUs (torch threads) each point takes (default: Ray's CPUs / "
                            "--max-parallel)")
    sweep.add_argument("--retries", type=int, default=1,
                       help="times Ray reruns a point whose worker died (default 1)")
    sweep.add_argument("--dry-run", action="store_true", help="print the points; run nothing")
    sweep.add_argument("--json", action="store_true", help="print the outcome as JSON")
    add_db_argument(sweep)
    sweep.set_defaults(handler=_guarded(cmd_sweep))

    sweeps = subparsers.add_parser("sweeps", help="list sweeps, or the points of one")
    sweeps.add_argument("sweep_id", type=int, nargs="?", metavar="SWEEP_ID")
    sweeps.add_argument("--json", action="store_true")
    add_db_argument(sweeps)
    sweeps.set_defaults(handler=_guarded(cmd_sweeps))

    export = subparsers.add_parser("sweep-export", help="write a sweep and all its runs to "
                                                       "one zip file")
    export.add_argument("sweep_id", type=int, metavar="SWEEP_ID")
    export.add_argument("file", metavar="FILE", help="e.g. sweep-3.zip")
    add_db_argument(export)
    export.set_defaults(handler=_guarded(cmd_sweep_export))


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (SweepError, StoreError, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return run


def _spec_from_args(args: argparse.Namespace) -> SweepSpec:
    if not args.axis:
        raise SweepError("give at least one --axis NAME=V1,V2,... (e.g. --axis "
                         "block_size=8,16,32), or --resume SWEEP_ID")
    base = RunConfig()
    if args.base:
        text = args.base
        if not text.lstrip().startswith("{"):
            if not Path(text).is_file():
                raise SweepError(f"--base {text}: no such file; give a RunConfig JSON file")
            text = Path(text).read_text(encoding="utf-8")
        base = load_base(text, f"--base {args.base}")
    axes = [parse_axis(a) for a in args.axis]
    base, axes = _absolute_paths(base, axes)
    spec = SweepSpec(base, axes, repeat=args.repeat, sample=args.sample,
                     sample_seed=args.sample_seed, name=args.name)
    _check_workloads(spec, local=args.ray_address is None)
    return spec


def _absolute_paths(base: RunConfig, axes: list[Axis]) -> tuple[RunConfig, list[Axis]]:
    """Workload files relative to this folder, made absolute: a worker runs in Ray's copy of
    the project, elsewhere."""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path else path

    workload = dataclasses.replace(base.workload, path=absolute(base.workload.path))
    axes = [Axis(a.name, [absolute(v) for v in a.values]) if axis_field(a.name) == "workload.path"
            else a for a in axes]
    return base.replace(workload=workload), axes


def _check_workloads(spec: SweepSpec, *, local: bool) -> None:
    """Workloads every point would fail on: an unknown preset, a file missing here (only
    known for a local Ray: a cluster's workers may see other files)."""
    from engine.workload import PRESETS

    for config in spec.point_configs():
        if isinstance(config, ConfigError):
            continue
        w = config.workload
        if w.kind == "preset" and w.name not in PRESETS:
            raise SweepError(f"workload preset {w.name!r} does not exist; presets are "
                             f"{', '.join(PRESETS)}")
        if w.kind == "file" and local and not Path(w.path or "").is_file():
            raise SweepError(f"workload file {w.path} does not exist; give an absolute path "
                             "to a JSON-lines file")


def cmd_sweep(args: argparse.Namespace) -> int:
    from sweep.driver import create_sweep, execute

    if args.resume is not None and (args.axis or args.base):
        raise SweepError("--resume runs the sweep's own points; leave out --base and --axis")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SweepError("--max-parallel must be at least 1")
    if args.threads_per_point is not None and args.threads_per_point < 1:
        raise SweepError("--threads-per-point must be at least 1")
    if args.retries < 0:
        raise SweepError("--retries must be >= 0")
    spec = _spec_from_args(args) if args.resume is None else None
    if spec is not None and args.dry_run:
        return _print_plan(spec, args.json)
    store = open_store(args.db)
    out = sys.stderr if args.json else sys.stdout
    try:
        sweep_id = args.resume if spec is None else create_sweep(store, spec)
        if spec is not None:
            print(f"sweep id: {sweep_id}", file=out, flush=True)
        bar = _ProgressBar(sys.stderr)
        try:
            result = execute(store, sweep_id, ray_address=args.ray_address,
                             max_parallel=args.max_parallel, retries=args.retries,
                             threads_per_point=args.threads_per_point,
                             on_progress=bar.update)
        except KeyboardInterrupt:
            bar.done()
            print(f"stopped: finished points are kept; run the rest with `python cli.py sweep "
                  f"--resume {sweep_id}`", file=sys.stderr)
            return EXIT_INTERRUPTED
        bar.done()
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            _print_points(store, sweep_id)
            r = result.to_dict()
            print(f"\n{r['finished']} of {r['points']} points finished, {r['failed']} failed; "
                  f"{r['ran_now']} ran in {r['elapsed_s']:.1f} s ({r['points_per_min']:.1f} "
                  f"points/min, {r['max_parallel']} at once, {r['model_loads']} model loads)")
    finally:
        store.dispose()
    return 0


def _print_plan(spec: SweepSpec, as_json: bool) -> int:
    points = spec.points()
    configs = spec.point_configs()
    rows = [{"point": i, "values": p["values"], "repeat": p["repeat"],
             "error": str(c) if isinstance(c, ConfigError) else None}
            for i, (p, c) in enumerate(zip(points, configs, strict=True))]
    if as_json:
        print(json.dumps({"points": rows}))
        return 0
    for row in rows:
        note = f"  (fails: {row['error']})" if row["error"] else ""
        again = f"  (repeat {row['repeat']})" if row["repeat"] else ""
        print(f"{row['point']:>4}  {point_label(row['values'])}{again}{note}")
    print(f"{len(rows)} points")
    return 0


def _print_points(store, sweep_id: int) -> None:
    from store.sweeps import sweep_info, sweep_points

    df = sweep_points(store, sweep_id)
    df["error"] = df["error"].fillna("").str.slice(0, 100)  # the run row has all of it
    axes = sweep_info(store, sweep_id).axis_names
    columns = ["point", *axes, "status", "run_id",
               *[c for c in SHOWN_COLUMNS if c in df.columns], "error"]
    print(df[[c for c in columns if c in df.columns]].to_string(index=False))


class _ProgressBar:
    """Points done / failed / running and an ETA: one redrawn line on a terminal, a line per
    change otherwise (logs)."""

    def __init__(self, stream) -> None:
        self.stream, self.tty = stream, stream.isatty()
        self.last = ""

    def update(self, p) -> None:
        eta = f"ETA {p.eta_s:.0f} s" if p.eta_s is not None else "ETA ?"
        finished = p.done + p.failed
        width = 30
        bar = "#" * int(width * finished / max(1, p.total))
        line = (f"[{bar:<{width}}] {p.done}/{p.total} done, {p.failed} failed, {p.running} "
                f"running, {p.pending} waiting  {eta}")
        counts = line.split("  ETA")[0]
        if self.tty:
            print(f"\r{line}\033[K", end="", file=self.stream, flush=True)
        elif counts != self.last:
            print(line, file=self.stream, flush=True)
        self.last = counts

    def done(self) -> None:
        if self.tty and self.last:
            print(file=self.stream)


def cmd_sweeps(args: argparse.Namespace) -> int:
    from store.sweeps import list_sweeps, sweep_points

    store = open_store(args.db)
    try:
        if args.sweep_id is None:
            df = list_sweeps(store)
        else:
            df = sweep_points(store, args.sweep_id)
    finally:
        store.dispose()
    if args.json:
        print(df.to_json(orient="records", date_format="iso"))
    elif df.empty:
        print("no sweeps yet; run one with `python cli.py sweep --base config.json --axis ...`")
    else:
        print(df.to_string(index=False))
    return 0


def cmd_sweep_export(args: argparse.Namespace) -> int:
    from store.sweeps import export_sweep

    store = open_store(args.db)
    try:
        path = export_sweep(store, args.sweep_id, args.file)
    finally:
        store.dispose()
    print(f"exported sweep {args.sweep_id} to {path}")
    return 0
