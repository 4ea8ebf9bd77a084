"""Crash safety and concurrency: a SIGKILLed writer keeps every committed step and is marked
interrupted on the next open; two writers and a polling reader lose nothing and never see
"database is locked"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from store_fixtures import (  # noqa: F401 (fixtures)
    ROOT,
    assert_consistent,
    fake_run,
    fixture_db_url,
    fixture_make_db_url,
)

from engine.trace import ListSink
from store import RunReader, export_run, import_run, open_store


def _start(argv: list[str]) -> tuple[subprocess.Popen, int]:
    """Start a writer process; returns it and the run id it prints first."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("run id: "):
        proc.kill()
        raise AssertionError(f"no run id from {argv}: {line!r} {proc.stderr.read()}")
    return proc, int(line.removeprefix("run id: "))


def _wait_for_steps(reader: RunReader, run_id: int, proc: subprocess.Popen, steps: int,
                    timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while reader.last_step(run_id) < steps:
        assert proc.poll() is None, f"writer exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"fewer than {steps} steps after {timeout_s} s"
        time.sleep(0.1)


def _kill_and_check(db_url: str, proc: subprocess.Popen, run_id: int, min_steps: int) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    store = open_store(db_url)
    try:
        reader = RunReader(store)
        info = reader.run_info(run_id)
        assert info.status == "interrupted", info
        assert assert_consistent(reader, run_id) >= min_steps
    finally:
        store.dispose()


def test_sigkilled_writer_keeps_committed_steps(db_url: str) -> None:
    proc, run_id = _start(["tests/store_fixtures.py", "--db", db_url, "--steps", "1000000",
                           "--delay", "0.0005", "--flush", "0.05"])
    watcher = open_store(db_url)
    try:
        reader = RunReader(watcher)
        _wait_for_steps(reader, run_id, proc, 300, timeout_s=60)
        assert reader.run_info(run_id).status == "running"  # a live writer is left alone
        _kill_and_check(db_url, proc, run_id, min_steps=300)
    finally:
        watcher.dispose()
        if proc.poll() is None:
            proc.kill()


def _engine_available() -> bool:
    try:
        import engine.run  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _engine_available(), reason="engine.run is not importable yet")
def test_sigkilled_cli_run_is_interrupted(db_url: str) -> None:
    proc, run_id = _start(["cli.py", "run", "--model", "tiny", "--workload", "long",
                           "--keyframe-interval", "5", "--db", db_url])
    watcher = open_store(db_url)
    try:
        _wait_for_steps(RunReader(watcher), run_id, proc, 12, timeout_s=240)
        _kill_and_check(db_url, proc, run_id, min_steps=12)
    finally:
        watcher.dispose()
        if proc.poll() is None:
            proc.kill()


def test_two_writers_and_a_polling_reader(db_url: str) -> None:
    steps = 400
    writers = [_start(["tests/store_fixtures.py", "--db", db_url, "--steps", str(steps),
                       "--seed", str(seed), "--delay", "0.002", "--flush", "0.01"])
               for seed in (1, 2)]
    store = open_store(db_url)
    reads = 0
    try:
        reader = RunReader(store)
        while any(proc.poll() is None for proc, _ in writers):
            runs = reader.list_runs()
            for run_id in runs.run_id:
                last = reader.last_step(int(run_id))
                reader.block_events(int(run_id), step_from=max(0, last - 5))
                reader.block_state_at(int(run_id), last)
                reads += 1
            time.sleep(0.02)  # poll like a dashboard, not a busy loop on a 2-core machine
        for proc, _ in writers:
            stderr = proc.stderr.read()
            assert proc.returncode == 0 and "locked" not in stderr, stderr
        for seed, (_, run_id) in zip((1, 2), writers, strict=True):
            assert reader.run_info(run_id).status == "finished"
            assert assert_consistent(reader, run_id) == steps
            truth = fake_run(ListSink(), steps, seed=seed)
            assert reader.block_state_at(run_id, steps).to_keyframe(steps) == truth[steps]
        assert reads > 10
    finally:
        store.dispose()


def test_export_of_a_growing_run_is_one_consistent_snapshot(make_db_url, tmp_path) -> None:
    """Exports taken while a writer commits every 10 ms import back self-consistent: the
    manifest's step count, the steps, the events and the keyframes all end at one step."""
    source_url, target_url = make_db_url(), make_db_url()
    open_store(source_url).dispose()  # create the schema before the writer and reader race
    proc, run_id = _start(["tests/store_fixtures.py", "--db", source_url, "--steps", "1500",
                           "--delay", "0.002", "--flush", "0.01"])
    source, target = open_store(source_url), open_store(target_url)
    try:
        _wait_for_steps(RunReader(source), run_id, proc, 20, timeout_s=60)
        imported = []
        while proc.poll() is None and len(imported) < 8:
            path = export_run(source, run_id, tmp_path / f"growing-{len(imported)}.kvtrace.zip")
            imported.append(import_run(target, path))
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        assert len(imported) >= 2, "the writer finished before two exports were taken"
        reader = RunReader(target)
        truth = fake_run(ListSink(), 1500, seed=0)
        for new_id in imported:
            last = assert_consistent(reader, new_id)
            assert reader.block_state_at(new_id, last).to_keyframe(last) == truth[last]
    finally:
        source.dispose()
        target.dispose()
        if proc.poll() is None:
            proc.kill()
