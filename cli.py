"""KV Cache Lab command line: the same engine and store code paths as the dashboard.

    python cli.py generate --prompt "..." [--chat] --max-tokens N [--temperature T --seed S]
    python cli.py run [--model smollm2|tiny|mla-lite|mla-tiny|FOLDER] [--workload NAME|FILE]
        [--num-blocks N | --kv-budget 64MiB] [--no-prefix-caching] [--max-requests N]
        [--mla-path auto|absorbed|expanded] [--json] [--db URL]
    python cli.py runs | export RUN_ID FILE | import FILE [--copy] | delete RUN_ID   (the store)
    python cli.py quality --kv-dtype int4 [--kv-rotate] [--json]   (a cache format's cost)
    python cli.py convert-mla --rank R [--rope-dims D] [--out FOLDER]   (SmolLM2 as MLA; see
        engine/models/mla_convert.py)
    python cli.py sweep --base config.json --axis block_size=8,16 [--axis ...] (Ray sweeps;
        see sweep/cli_commands.py) | sweeps [SWEEP_ID] | sweep-export SWEEP_ID FILE

Bad input exits with status 2 and one line on stderr naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mla_cli
import quality_cli

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """One line for stderr; the process exits with status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    from store.cli_commands import add_db_argument, register_commands
    from sweep.cli_commands import register_commands as register_sweep_commands

    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object with token_ids and text")
    _add_engine_arguments(gen)
    gen.set_defaults(handler=cmd_generate)

    run = sub.add_parser("run", help="run a workload and print a summary")
    run.add_argument("--workload", default="shared-prefix",
                     help="a preset name (shared-prefix, prompts, mixed, chat, long) or a "
                          "file: JSON lines, an OpenAI batch input file or ShareGPT JSON")
    run.add_argument("--max-requests", type=int, default=100_000,
                     help="refuse a workload file with more requests than this")
    run.add_argument("--max-workload-bytes", default="256MiB",
                     help="refuse a workload file larger than this, e.g. 1GiB")
    run.add_argument("--block-size", type=int, default=16)
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--num-blocks", type=int)
    budget.add_argument("--kv-budget", help="KV cache size, e.g. 64MiB; turned into blocks")
    budget.add_argument("--kv-memory-fraction", type=float,
                        help="vLLM's gpu_memory_utilization: the share of device memory (CPU: "
                             "what the process may hold) for weights, activations and the "
                             "cache; the cache gets the rest")
    run.add_argument("--telemetry-hz", type=float, default=10.0,
                     help="device readings per second in the trace (0: none)")
    run.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--max-num-seqs", type=int, default=8)
    run.add_argument("--max-num-batched-tokens", type=int, default=512)
    run.add_argument("--max-model-len", type=int)
    run.add_argument("--kv-dtype", default="auto",
                     help="auto (the weights' dtype), fp32, bf16, fp16, fp8, int8 or int4")
    run.add_argument("--kv-rotate", action="store_true",
                     help="Hadamard-rotate keys and queries before quantizing (fp8/int8/int4)")
    run.add_argument("--policy", default="full",
                     help="what each layer (or KV head range) keeps, e.g. full or "
                          "'0-14:full; 15-29:full' (one KV cache group per range)")
    run.add_argument("--keyframe-interval", type=int, default=50)
    run.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    run.add_argument("--name", help="a name for the stored run")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _add_engine_arguments(run)
    add_db_argument(run)
    run.set_defaults(handler=cmd_run)

    register_commands(sub)
    quality_cli.register(sub, _add_engine_arguments, add_db_argument)
    mla_cli.register(sub)
    register_sweep_commands(sub)
    return parser


DTYPE_HELP = "auto (bf16 on CUDA and on CPUs with bf16 instructions, else fp32), fp32, bf16, fp16"


def _add_engine_arguments(parser: argparse.ArgumentParser, dtype_default: str = "auto",
                          dtype_help: str = DTYPE_HELP) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (bundled), tiny, mla-lite or mla-tiny (random by seed), "
                             "or a Hugging Face model folder (config.json + *.safetensors: "
                             "Llama, DeepSeek-V2/V3)")
    parser.add_argument("--mla-path", default="auto", choices=("auto", "absorbed", "expanded"),
                        help="MLA models: attend through the latent (absorbed) or by "
                             "up-projecting it (expanded); auto absorbs decode and picks per "
                             "prefill chunk by cost")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default=dtype_default, help=dtype_help)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.trace import ListSink
    from engine.workload import WorkloadRequest

    config = _config_from_args(args, max_model_len=None)
    if args.chat:
        request = WorkloadRequest(0, messages=[{"role": "user", "content": args.prompt}],
                                  max_tokens=args.max_tokens)
    else:
        request = WorkloadRequest(0, prompt=args.prompt, max_tokens=args.max_tokens)
    result = _run_engine(config, ListSink(), requests=[request])
    if args.json:
        print(json.dumps({"token_ids": result.output_token_ids.get(0, []),
                          "text": result.output_text.get(0, "")}))
    else:
        print(result.output_text.get(0, ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from engine.trace import ListSink

    config = _config_from_args(args, max_model_len=args.max_model_len)
    requests = _workload(config, args)
    progress = (_Progress(sum(r.max_tokens for r in requests))
                if sys.stderr.isatty() and not args.json else None)
    writer = _open_writer(args, config)
    sink = writer if writer is not None else ListSink()
    try:
        result = _run_engine(config, sink, requests=requests,
                             on_step=progress.update if progress else None)
    except BaseException as exc:
        if writer is not None:
            interrupted = isinstance(exc, KeyboardInterrupt)
            writer.close(error=None if interrupted else repr(exc), interrupted=interrupted)
        raise
    if progress:
        progress.done()
    summary = result.summary.to_dict()
    if writer is not None:
        writer.close(summary=result.summary)
        summary["run_id"] = writer.run_id
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def _workload(config, args: argparse.Namespace) -> list:
    """The run's requests; a file's detected format is announced (on stderr with --json, so
    stdout stays one JSON object)."""
    from engine.config import ConfigError, parse_bytes
    from engine.workload import (
        WorkloadError,
        WorkloadLimits,
        build_workload,
        by_arrival,
        read_workload_file,
    )

    try:
        limits = WorkloadLimits(max_requests=args.max_requests,
                                max_bytes=parse_bytes(args.max_workload_bytes))
    except ConfigError as exc:
        raise CliError(f"cannot read --max-workload-bytes {args.max_workload_bytes!r} as a "
                       "size; write e.g. 256MiB or 1GiB") from exc
    if limits.max_requests < 1 or limits.max_bytes < 1:
        raise CliError("--max-requests and --max-workload-bytes must be at least 1")
    try:
        if config.workload.kind != "file":
            return build_workload(config.workload, config.seed, limits=limits)
        loaded = read_workload_file(config.workload.path, limits=limits)
    except WorkloadError as exc:
        raise CliError(str(exc)) from exc
    print(f"workload: {loaded.describe()}", file=sys.stderr if args.json else sys.stdout,
          flush=True)
    return by_arrival(loaded.requests)


def _open_writer(args: argparse.Namespace, config):
    if not args.db:
        return None
    from store import RunWriter, StoreError, open_store

    def announce(run_id: int) -> None:  # the row appears with the run's first keyframe
        print(f"run id: {run_id}", file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        store = open_store(args.db)
        return RunWriter(store, config, name=args.name, on_open=announce)
    except StoreError as exc:
        raise CliError(str(exc)) from exc


def _config_from_args(args: argparse.Namespace, max_model_len: int | None):
    from engine.config import ConfigError, RunConfig, SamplingConfig, parse_bytes
    from engine.device import DeviceError, resolve_device

    try:
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, ignore_eos=getattr(args, "ignore_eos", False))
        knobs = dict(model=args.model, device=args.device, dtype=args.dtype,
                     seed=args.seed, sampling=sampling, max_model_len=max_model_len,
                     mla_path=args.mla_path)
        if args.command == "run":
            knobs.update(
                block_size=args.block_size, num_blocks=args.num_blocks,
                kv_budget_bytes=parse_bytes(args.kv_budget) if args.kv_budget else None,
                kv_memory_fraction=args.kv_memory_fraction, telemetry_hz=args.telemetry_hz,
                enable_prefix_caching=args.prefix_caching, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, kv_dtype=args.kv_dtype,
                policy=args.policy, kv_rotate=args.kv_rotate,
                keyframe_interval=args.keyframe_interval,
                workload=_workload_spec(args.workload),
            )
        config = RunConfig(**knobs)
    except ConfigError as exc:
        raise CliError(f"{exc} (option {_option_for(exc.field)})") from exc
    try:
        resolve_device(config.device)  # before anything is stored: a missing GPU is bad input
    except DeviceError as exc:
        raise CliError(f"{exc} (option --device)") from exc
    return config


def _option_for(field_name: str) -> str:
    """The command-line option that sets a RunConfig field, for error messages."""
    if field_name.startswith("workload"):
        return "--workload"
    special = {"kv_budget_bytes": "--kv-budget", "kv_budget": "--kv-budget",
               "kv_memory_fraction": "--kv-memory-fraction",
               "enable_prefix_caching": "--prefix-caching"}
    return special.get(field_name, "--" + field_name.replace("_", "-"))


def _workload_spec(text: str):
    from engine.config import WorkloadSpec

    if text.endswith((".jsonl", ".json")) or Path(text).is_file():
        if not Path(text).is_file():
            raise CliError(f"workload file {text} does not exist; give a workload file (JSON "
                           "lines, OpenAI batch or ShareGPT) or a preset name")
        return WorkloadSpec(kind="file", path=str(Path(text).resolve()))
    return WorkloadSpec(kind="preset", name=text)


def _run_engine(config, sink, **kwargs):
    from engine.device import DeviceError
    from engine.memory_profile import KVBudgetError
    from engine.models.gguf_loader import ModelFileError
    from engine.models.hf_config import ModelFolderError
    from engine.run import run
    from engine.workload import WorkloadError

    try:
        return run(config, sink, **kwargs)
    except (WorkloadError, DeviceError, ModelFileError, ModelFolderError,
            KVBudgetError) as exc:
        raise CliError(str(exc)) from exc


class _Progress:
    """A one-line progress bar on stderr (only on a terminal), by generated tokens: an upper
    bound of the work, since a request that meets its stop token ends early."""

    def __init__(self, max_total_tokens: int):
        self.max_total_tokens = max(1, max_total_tokens)
        self.tokens = 0

    def update(self, record) -> None:
        self.tokens += record.num_generated_tokens
        width = 30
        bar = "#" * int(min(1.0, self.tokens / self.max_total_tokens) * width)
        print(f"\r[{bar:<{width}}] step {record.step}  running {record.num_running}  waiting "
              f"{record.num_waiting}  blocks {record.blocks_used}  tokens {self.tokens}",
              end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        print(file=sys.stderr)


def _print_summary(s: dict) -> None:
    rows = [
        ("requests", f"{s['num_finished']} finished / {s['num_requests']} "
                     f"({s['num_rejected']} rejected)"),
        ("tokens", f"{s['prompt_tokens']} prompt, {s['output_tokens']} generated"),
        ("steps", f"{s['steps']} in {s['elapsed_s']:.2f} s"),
        ("throughput", f"{s['output_tokens_per_s']:.1f} generated tokens/s"),
        ("prefix hit rate", f"{100 * s['prefix_hit_rate']:.1f} %"),
        ("preemptions", s["num_preemptions"]),
        ("evictions", s["num_evictions"]),
        ("peak blocks used", f"{s['peak_blocks_used']} of {s['num_blocks']}"),
        ("KV bytes per token", f"{s['kv_bytes_per_token']} ({s['kv_dtype']}, {s['device']}; "
                               f"allocated: {s.get('kv_allocated_bytes_per_token')})"),
        ("KV cache groups", _groups_line(s.get("kv_groups") or [], s.get("kv_page_size_bytes"))),
    ]
    profile = s.get("memory_profile") or {}
    if profile:
        rows.append(("memory", ", ".join(
            f"{label} {profile[key] / 2**20:,.1f} MiB" for label, key in (
                ("weights", "weights_bytes"), ("activations", "activation_peak_bytes"),
                ("KV cache", "kv_cache_bytes"), ("other torch", "other_torch_bytes"),
                ("non-torch", "non_torch_bytes")))))
        rows.append(("KV blocks", profile.get("kv_blocks_rule", "")))
    if s.get("gpu_note"):
        rows.append(("GPU telemetry", s["gpu_note"]))
    for label, value in rows:
        print(f"{label:>20}: {value}")


def _groups_line(groups: list[dict], page_size: int | None) -> str:
    """'1 (layers 0-29, KV heads 0-2: full), 737280 bytes per block'."""
    shown = "; ".join(f"layers {g['layers']}, KV heads {g['kv_heads']}: {g['policy']}"
                      for g in groups[:4])
    more = f"; ... {len(groups) - 4} more" if len(groups) > 4 else ""
    return f"{len(groups)} ({shown}{more}), {page_size} bytes per block"


if __name__ == "__main__":
    sys.exit(main())
