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


def test_run_announces_an_openai_batch_file_and_stores_its_ids(tmp_path):
    from store import RunReader, open_store

    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 3}}
             for i in range(2)]
    workload = tmp_path / "batch.jsonl"
    workload.write_text("\n".join(json.dumps(line) for line in lines))
    url = f"sqlite:///{tmp_path / 'kvlab.db'}"
    proc = cli("run", "--model", "tiny", "--workload", str(workload), "--num-blocks", "64",
               "--max-model-len", "128", "--db", url)
    assert proc.returncode == 0, proc.stderr
    assert f"workload: 2 requests from {workload} (OpenAI batch format)" in proc.stdout
    store = open_store(url)
    try:
        (run_id,) = RunReader(store).list_runs().run_id.tolist()
        requests = RunReader(store).requests(run_id).sort_values("request_id")
        assert requests["label"].tolist() == ["req-0", "req-1"]
    finally:
        store.dispose()


def test_workload_limits_are_options(tmp_path):
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    proc = cli("run", "--model", "tiny", "--workload", str(workload), "--max-requests", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {workload} has 2 requests; the limit is 1 (raise it "
                                   "with --max-requests)")
    proc = cli("run", "--model", "tiny", "--workload", str(workload), "--max-workload-bytes",
               "10")
    assert proc.returncode == 2 and "is 32 bytes; the limit is 10" in proc.stderr
