"""`cli.py convert-mla`: SmolLM2 with its attention turned into MLA, written as a model folder.

    python cli.py convert-mla --rank R [--rope-dims D] [--out FOLDER] [--calibration-tokens N]
        [--json]

The folder (config.json + model.safetensors, DeepSeek-V2 format with our `kvlab_` keys) runs
anywhere a model is named: `cli.py run --model FOLDER`, `cli.py quality --model FOLDER` (which
then scores it against SmolLM2 itself). Method and what is approximated:
engine/models/mla_convert.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
DEFAULT_DIR = Path("data") / "models"  # git-ignored: converted folders are generated


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert-mla", help="turn SmolLM2's GQA into MLA (a model folder)")
    c.add_argument("--rank", type=int, required=True,
                   help="kv_lora_rank R of the joint K_nope/V latent (lossless: "
                        "3 * (64 - D) + 192)")
    c.add_argument("--rope-dims", type=int, default=16,
                   help="RoPE dims kept per KV head (even, 2..64); the cache stores 3 * D")
    c.add_argument("--out", help=f"the folder to write (default {DEFAULT_DIR}/"
                                 "smollm2-mla-rR-dD)")
    c.add_argument("--calibration-tokens", type=int, default=2048,
                   help="tokens of held-out text that pick the RoPE pairs and the latent")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.set_defaults(handler=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    lossless = 3 * (64 - args.rope_dims) + 192
    problem = None
    if args.rope_dims % 2 or not 2 <= args.rope_dims <= 64:
        problem = f"--rope-dims must be even and in 2..64, not {args.rope_dims}"
    elif not 1 <= args.rank <= lossless:
        problem = (f"--rank must be in 1..{lossless} at --rope-dims {args.rope_dims} "
                   f"({lossless} is lossless), not {args.rank}")
    elif args.calibration_tokens < 16:
        problem = "--calibration-tokens must be at least 16"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import torch

    from engine.models.gguf_loader import ModelFileError
    from engine.models.loader import load_model
    from engine.models.mla_convert import convert

    out = Path(args.out or DEFAULT_DIR / f"smollm2-mla-r{args.rank}-d{args.rope_dims}")
    try:
        loaded = load_model("smollm2", torch.device("cpu"), torch.float32)
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with torch.inference_mode():
        report = convert(loaded, args.rank, args.rope_dims, out, args.calibration_tokens)
    figures = report.to_dict(num_layers=loaded.config.num_layers)
    if args.json:
        print(json.dumps(figures))
        return 0
    bf16 = report.to_dict(dtype_bytes=2, num_layers=loaded.config.num_layers)
    rows = [
        ("folder", figures["folder"]),
        ("latent", f"rank {args.rank} + RoPE 3 x {args.rope_dims} = "
                   f"{figures['kv_values_per_token_per_layer']} values per token per layer "
                   f"(GQA: 384)"),
        ("KV bytes per token", f"{figures['kv_bytes_per_token']:,} fp32, "
                               f"{bf16['kv_bytes_per_token']:,} bf16 "
                               f"({100 * figures['fraction_of_gqa']:.1f} % of SmolLM2's)"),
        ("calibration", f"{figures['calibration_tokens']} tokens of held-out text"),
        ("next", f"python cli.py quality --model {out} --context 1024 --num-scored 128"),
    ]
    for label, value in rows:
        print(f"{label:>20}: {value}")
    return 0
