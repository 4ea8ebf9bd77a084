"""`cli.py quality`: what a KV cache format or policy costs, measured on the real model.

    python cli.py quality --kv-dtype int4 [--kv-rotate] [--policy P] [--text-file F]
        [--context 2048] [--num-scored 256] [--passages 8] [--json] [--db URL | --no-store]

Prints the figures (KL divergence from the fp32 full cache, top-1 agreement, both
perplexities, KV bytes per token held) and stores them in the trace database, where the
Quality page plots every evaluation ever made. A model folder written by `cli.py convert-mla`
is scored against the model it was converted from (SmolLM2, fp32 full cache): the figures are
then what the conversion and the cache format cost together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction, add_engine_arguments, add_db_argument) -> None:
    q = sub.add_parser("quality", help="measure a KV cache format's cost against the fp32 cache")
    q.add_argument("--kv-dtype", default="fp32",
                   help="fp32, bf16, fp16, fp8, int8 or int4 (the candidate cache)")
    q.add_argument("--kv-rotate", action="store_true",
                   help="Hadamard-rotate keys and queries before quantizing")
    q.add_argument("--policy", default="full", help="what each layer keeps (see `run --help`)")
    q.add_argument("--block-size", type=int, default=16)
    q.add_argument("--text-file", help="score this UTF-8 text instead of the bundled held set")
    q.add_argument("--context", type=int, default=2048, help="tokens of context per passage")
    q.add_argument("--num-scored", type=int, default=256,
                   help="last tokens of each passage scored one decode step at a time")
    q.add_argument("--passages", type=int, default=8, help="passages (of the held set or file)")
    q.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    q.add_argument("--no-store", action="store_true", help="do not store the result")
    # fp32 weights by default, whatever the run default is on this machine: the reference is
    # the same weights with an fp32 cache, so the figures are then the cache's cost alone
    add_engine_arguments(q, dtype_default="fp32",
                         dtype_help="weights' dtype: fp32 (default; the figures are the cache's "
                                    "cost alone), bf16, fp16 or auto (the run default)")
    add_db_argument(q)
    q.set_defaults(handler=cmd_quality)

    c = sub.add_parser("calibrate-heads",
                       help="score each KV head's need for its full cache (DuoAttention)")
    c.add_argument("--sink", type=int, default=4)
    c.add_argument("--recent", type=int, default=128)
    c.add_argument("--full-fraction", type=float, default=0.5,
                   help="share of KV heads that keep the full cache in the policy printed")
    c.add_argument("--context", type=int, default=1024)
    c.add_argument("--num-queries", type=int, default=32)
    c.add_argument("--passages", type=int, default=2)
    c.add_argument("--json", action="store_true")
    add_engine_arguments(c)
    c.set_defaults(handler=cmd_calibrate_heads)


EXIT_BAD_INPUT = 2


class CliError(Exception):
    """One line for stderr; the command exits with status 2."""


def cmd_quality(args: argparse.Namespace) -> int:
    try:
        return _quality(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _quality(args: argparse.Namespace) -> int:
    from engine.config import ConfigError, RunConfig
    from engine.models.hf_config import ModelFolderError
    from engine.quality import QualityError, evaluate, held_set, passage_tokens, split_text
    from engine.run import load_model_for

    try:
        config = RunConfig(model=args.model, device=args.device, dtype=args.dtype,
                           kv_dtype=args.kv_dtype, kv_rotate=args.kv_rotate, policy=args.policy,
                           block_size=args.block_size, seed=args.seed, mla_path=args.mla_path,
                           max_model_len=min(args.context + 1, _context_limit(args.model)))
        source_model = getattr(config.model_config, "converted_from", None)
        reference_config = config.replace(model=source_model) if source_model else None
    except ConfigError as exc:
        raise CliError(f"{exc} (option --{exc.field.replace('_', '-')})") from exc
    try:
        loaded = load_model_for(config)
    except ModelFolderError as exc:
        raise CliError(str(exc)) from exc
    reference = load_model_for(reference_config) if reference_config else None
    try:
        if args.text_file:
            text = _read_text(args.text_file)
            passages = split_text(text, loaded.tokenizer, args.context, args.passages)
            source = Path(args.text_file).name
        else:
            passages = passage_tokens(held_set(args.passages), loaded.tokenizer, args.context)
            source = "held set"
        progress = _progress if sys.stderr.isatty() and not args.json else None
        result = evaluate(config, loaded, passages, context=args.context,
                          num_scored=args.num_scored, source=source, on_progress=progress,
                          reference=reference)
    except QualityError as exc:
        raise CliError(str(exc)) from exc
    figures = result.to_dict()
    if reference is not None:
        figures["reference_model"] = reference.config.name
    if not args.no_store:
        figures["quality_id"] = _store(args.db, result, config)
    if args.json:
        print(json.dumps(figures))
    else:
        _print(figures)
    return 0


def cmd_calibrate_heads(args: argparse.Namespace) -> int:
    try:
        return _calibrate(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _calibrate(args: argparse.Namespace) -> int:
    from engine.config import ConfigError, RunConfig
    from engine.head_calibration import score_heads
    from engine.quality import QualityError, held_set, passage_tokens
    from engine.run import load_model_for

    if not 0 <= args.full_fraction <= 1 or args.num_queries >= args.context:
        raise CliError("--full-fraction must be in 0..1 and --num-queries below --context")
    try:
        config = RunConfig(model=args.model, device=args.device, dtype=args.dtype,
                           max_model_len=min(args.context + 1, _context_limit(args.model)))
        loaded = load_model_for(config)
        passages = passage_tokens(held_set(args.passages), loaded.tokenizer, args.context)
    except (ConfigError, QualityError) as exc:
        raise CliError(str(exc)) from exc
    result = score_heads(loaded, passages, sink=args.sink, recent=args.recent,
                         num_queries=args.num_queries)
    policy = result.policy(args.full_fraction, f"window({args.sink},{args.recent})")
    if args.json:
        print(json.dumps({"scores": result.scores, "sink": args.sink, "recent": args.recent,
                          "policy": policy}))
        return 0
    print(f"attention mass outside a window of {args.sink} sink + {args.recent} recent tokens,"
          f" per KV head ({args.passages} held-set passages, last {args.num_queries} of "
          f"{args.context} tokens):")
    for layer, row in enumerate(result.scores):
        print(f"  layer {layer:>2}: " + "  ".join(f"h{h} {s:.3f}" for h, s in enumerate(row)))
    print(f"policy (top {100 * args.full_fraction:.0f} % of heads full):\n{policy}")
    return 0


def _context_limit(model: str) -> int:
    from engine.models.config import MODEL_CONFIGS
    from engine.models.hf_config import ModelFolderError, looks_like_path, read_folder_config

    if model in MODEL_CONFIGS:
        return MODEL_CONFIGS[model].max_position_embeddings
    if looks_like_path(model):
        try:
            return read_folder_config(model).max_position_embeddings
        except ModelFolderError:
            pass  # RunConfig says what is wrong with the folder
    return 1 << 30


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CliError(f"text file {path} does not exist; give a UTF-8 text file") from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"{path} is not UTF-8 text; give a UTF-8 text file") from exc


def _store(db: str | None, result, config) -> int:
    from store import StoreError, open_store
    from store.quality import save_quality

    try:
        store = open_store(db)
        try:
            return save_quality(store, result, config)
        finally:
            store.dispose()
    except StoreError as exc:
        raise CliError(f"{exc} (the figures were measured; rerun with --no-store to skip "
                       "storing)") from exc


def _progress(fraction: float) -> None:
    width = 30
    print(f"\r[{'#' * int(fraction * width):<{width}}] {100 * fraction:5.1f} %", end="",
          file=sys.stderr, flush=True)
    if fraction >= 1.0:
        print(file=sys.stderr)


def _print(f: dict) -> None:
    rotate = " + Hadamard rotation" if f["kv_rotate"] else ""
    rows = [
        ("cache", f"{f['kv_dtype']}{rotate}, policy {f['policy']}, block {f['block_size']}"),
        ("reference", f"{f.get('reference_model') or f['model']}, fp32 full cache"),
        ("scored", f"{f['num_tokens_scored']} tokens ({f['num_passages']} passages of "
                   f"{f['context']} from {f['source']})"),
        ("KL(fp32 || cache)", f"{f['kl_mean']:.6f} nats per token"),
        ("top-1 agreement", f"{100 * f['top1']:.2f} %"),
        ("perplexity", f"{f['ppl']:.3f} (fp32 cache: {f['ppl_ref']:.3f})"),
        ("KV bytes per token", f"{f['kv_bytes_per_token']:,.1f}"),
        ("time", f"{f['elapsed_s']:.1f} s"),
    ]
    if "quality_id" in f:
        rows.append(("stored as", f"quality result {f['quality_id']}"))
    for label, value in rows:
        print(f"{label:>20}: {value}")
