"""`cli.py sweep`, `sweeps`, `sweep-export`: one-line errors with exit status 2 before anything
runs, and a small sweep on a local Ray end to end (run, list, resume, export)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
from test_cli import ROOT, cli

BASE = {"model": "tiny", "device": "cpu", "max_model_len": 128,
        "workload": {"kind": "synthetic", "num_requests": 3, "prompt_len_min": 16,
                     "prompt_len_max": 24, "output_len_min": 4, "output_len_max": 8}}


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.json"
    path.write_text(json.dumps(BASE))
    return path


@pytest.mark.parametrize(("args", "needle"), [
    (["--axis", "blok_size=8"], "not a RunConfig setting"),
    (["--axis", "block_size=8,24"], "not a power of two"),
    (["--axis", "kv_budget=lots"], "kv_budget=4MiB"),
    (["--axis", "workload.name=nope", "--base", '{"workload": {"kind": "preset"}}'],
     "preset 'nope' does not exist"),
    (["--axis", "workload.path=/no/such.jsonl", "--base",
      '{"workload": {"kind": "file", "path": "/no/such.jsonl"}}'], "does not exist"),
    (["--base", "missing.json", "--axis", "block_size=8"], "no such file"),
    (["--base", '{"block_size": 3}', "--axis", "seed=1,2"], "power of two"),
    ([], "at least one --axis"),
    (["--resume", "1", "--axis", "block_size=8"], "leave out --base and --axis"),
    (["--axis", "block_size=8", "--max-parallel", "0"], "--max-parallel"),
])
def test_bad_sweep_input_exits_2_with_one_line(args, needle, tmp_path):
    proc = cli("sweep", *args, "--db", f"sqlite:///{tmp_path}/k.db")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_unknown_sweep_ids_exit_2(tmp_path):
    db = f"sqlite:///{tmp_path}/k.db"
    for args in (["sweep", "--resume", "9"], ["sweeps", "9"], ["sweep-export", "9", "x.zip"]):
        proc = cli(*args, "--db", db)
        assert proc.returncode == 2 and "no sweep 9" in proc.stderr, proc.stderr


def test_dry_run_lists_the_points_and_their_failures(base_file):
    proc = cli("sweep", "--base", str(base_file), "--axis", "block_size=8,16",
               "--axis", "num_blocks=8,32", "--repeat", "2", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    points = json.loads(proc.stdout)["points"]
    assert len(points) == 8 and [p["error"] is not None for p in points].count(True) == 2


def test_relative_workload_files_become_absolute(tmp_path):
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "hi"}\n')
    relative = os.path.relpath(workload, ROOT)  # cli() runs in the project folder
    proc = cli("sweep", "--base", '{"workload": {"kind": "file", "path": "x"}}', "--axis",
               f"workload.path={relative}", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["points"][0]["values"]["workload.path"] == str(workload)


def test_a_sweep_runs_lists_resumes_and_exports(base_file, tmp_path):
    db = f"sqlite:///{tmp_path}/kvlab.db"
    proc = cli("sweep", "--base", str(base_file), "--axis", "block_size=8,16",
               "--max-parallel", "2", "--name", "cli", "--db", db, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["points"], out["finished"], out["failed"], out["max_parallel"]) == (2, 2, 0, 2)
    assert "sweep id: 1" in proc.stderr and "2/2 done" in proc.stderr  # the progress lines
    listing = json.loads(cli("sweeps", "--json", "--db", db).stdout)
    assert [(s["sweep_id"], s["name"], s["finished"]) for s in listing] == [(1, "cli", 2)]
    points = json.loads(cli("sweeps", "1", "--json", "--db", db).stdout)
    assert [p["block_size"] for p in points] == [8, 16]
    assert all(p["status"] == "finished" and p["output_tokens_per_s"] > 0 for p in points)
    resumed = cli("sweep", "--resume", "1", "--db", db, "--json")
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["ran_now"] == 0
    export = cli("sweep-export", "1", str(tmp_path / "s.zip"), "--db", db)
    assert export.returncode == 0, export.stderr
    with zipfile.ZipFile(tmp_path / "s.zip") as archive:
        assert len([n for n in archive.namelist() if n.endswith(".kvtrace.zip")]) == 2
