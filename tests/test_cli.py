"""The command line: summaries, JSON output and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_run_prints_a_json_summary():
    proc = cli("run", "--model", "tiny", "--workload", "mixed", "--json", "--num-blocks", "64",
               "--max-model-len", "512")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["num_requests"] == 16
    assert summary["num_finished"] + summary["num_rejected"] == 16
    assert summary["steps"] > 0 and summary["output_tokens"] > 0
    element = {"float32": 4, "bfloat16": 2}[summary["dtype"]]  # auto: bf16 where the CPU has it
    assert summary["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * element  # K,V x layers x heads x dim
    for key in ("output_tokens_per_s", "prefix_hit_rate", "num_preemptions", "num_evictions",
                "peak_blocks_used"):
        assert key in summary


def test_run_prints_a_readable_summary(tmp_path):
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "Hello there", "max_tokens": 5}\n'
                        '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}\n')
    proc = cli("run", "--model", "tiny", "--workload", str(workload), "--num-blocks", "64",
               "--max-model-len", "256")
    assert proc.returncode == 0, proc.stderr
    assert "prefix hit rate" in proc.stdout and "2 finished / 2" in proc.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--block-size", "24"], "power of two"),
        (["--num-blocks", "2", "--max-model-len", "512"], "needs 32"),
        (["--kv-budget", "lots"], "64MiB"),
        (["--workload", "no-such-preset"], "shared-prefix"),
        (["--workload", "missing.jsonl"], "does not exist"),
        (["--device", "cuda"], "CUDA"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    proc = cli("run", "--model", "tiny", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_bad_workload_line_names_its_line_number(tmp_path):
    workload = tmp_path / "bad.jsonl"
    workload.write_text('{"prompt": "ok"}\n{"prompt": "x", "max_tokens": 0}\n')
    proc = cli("run", "--model", "tiny", "--workload", str(workload))
    assert proc.returncode == 2
    assert "line 2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_generate_completes_a_chat_prompt_with_the_real_model():
    proc = cli("generate", "--prompt", "What is the capital of France?", "--chat",
               "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
