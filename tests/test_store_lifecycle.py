"""Opening a store: URL resolution, SQLite settings, schema versions and migrations, stale runs,
and the store's CLI commands."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update
from store_fixtures import (  # noqa: F401 (fixtures)
    FAKE_CONFIG,
    ROOT,
    FakeBlockManager,
    assert_events_rebuild_keyframes,
    fake_run,
    fixture_db_url,
    fixture_make_db_url,
    fixture_trace_store,
)

from store import RunReader, RunWriter, StoreError, export_run, open_store
from store import db as store_db
from store.cli_commands import register_commands
from store.models import Run, SchemaInfo


def test_url_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(store_db.ENV_VAR, raising=False)
    assert store_db.resolve_url(None) == f"sqlite:///{ROOT / 'data' / 'kvlab.db'}"
    monkeypatch.setenv(store_db.ENV_VAR, "sqlite:////tmp/from-env.db")
    assert store_db.resolve_url(None) == "sqlite:////tmp/from-env.db"
    assert store_db.resolve_url("sqlite:////tmp/flag.db") == "sqlite:////tmp/flag.db"


def test_sqlite_settings_and_directory_creation(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/new/dir/kvlab.db")
    try:
        assert (tmp_path / "new" / "dir" / "kvlab.db").exists()
        with store.engine.connect() as conn:
            pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
            assert pragma("journal_mode") == "wal"
            assert pragma("busy_timeout") == store_db.BUSY_TIMEOUT_MS
            assert pragma("synchronous") == 1  # NORMAL
    finally:
        store.dispose()


def _set_version(store, version: int) -> None:
    with store.write() as conn:
        conn.execute(update(SchemaInfo).values(version=version))


def test_newer_schema_is_refused(db_url: str) -> None:
    store = open_store(db_url)
    _set_version(store, store_db.SCHEMA_VERSION + 1)
    store.dispose()
    with pytest.raises(StoreError, match="newer|upgrade kvlab"):
        open_store(db_url)


def test_older_schema_is_migrated_in_order(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    open_store(db_url).dispose()
    applied = []
    current = store_db.SCHEMA_VERSION

    def add_index(conn) -> None:
        applied.append(current + 1)
        conn.execute(text("CREATE INDEX ix_runs_name_test ON runs (name)"))

    monkeypatch.setattr(store_db, "SCHEMA_VERSION", current + 2)
    monkeypatch.setattr(store_db, "MIGRATIONS", {current + 1: add_index,
                                                 current + 2: lambda conn: applied.append(
                                                     current + 2)})
    store = open_store(db_url)
    try:
        assert applied == [current + 1, current + 2]
        assert store_db.schema_version(store) == current + 2
        open_store(db_url).dispose()  # already migrated: nothing runs again
        assert applied == [current + 1, current + 2]
    finally:
        store.dispose()


def test_a_database_from_before_groups_migrates_and_replays(tmp_path: Path) -> None:
    """tests/data/kvlab-schema-v1.db was written by kvlab at schema version 1 (one fake run of
    40 steps, seed 5, no KV cache groups): it opens, migrates, and replays unchanged."""
    path = tmp_path / "old.db"
    shutil.copy(ROOT / "tests" / "data" / "kvlab-schema-v1.db", path)
    store = open_store(f"sqlite:///{path}")
    try:
        assert store_db.schema_version(store) == store_db.SCHEMA_VERSION
        reader = RunReader(store)
        assert assert_events_rebuild_keyframes(reader, 1) == [0, 10, 20, 30, 40]
        writer = RunWriter(store, FAKE_CONFIG)  # and new runs go in beside it
        fake_run(writer, 5)
        writer.close()
        assert reader.list_runs().run_id.tolist() == [writer.run_id, 1]
    finally:
        store.dispose()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _started(writer: RunWriter) -> RunWriter:
    """A writer whose run row exists: it appears with the first keyframe."""
    writer.record_keyframe(FakeBlockManager(4).snapshot(0))
    return writer


def test_only_runs_with_dead_writers_become_interrupted(trace_store) -> None:
    live = _started(RunWriter(trace_store, FAKE_CONFIG))
    dead = RunWriter(trace_store, FAKE_CONFIG)
    fake_run(dead, 30)
    dead.flush()
    remote_fresh = _started(RunWriter(trace_store, FAKE_CONFIG))
    remote_stale = _started(RunWriter(trace_store, FAKE_CONFIG))
    old = store_db.utcnow() - timedelta(hours=1)
    with trace_store.write() as conn:
        conn.execute(update(Run).where(Run.id == dead.run_id).values(writer_pid=_dead_pid()))
        conn.execute(update(Run).where(Run.id.in_([remote_fresh.run_id, remote_stale.run_id]))
                     .values(writer_host="another-host"))
        conn.execute(update(Run).where(Run.id == remote_stale.run_id).values(heartbeat_at=old))
    reopened = open_store(trace_store.url)
    try:
        reader = RunReader(reopened)
        status = {run_id: reader.run_info(run_id).status for run_id in
                  (live.run_id, dead.run_id, remote_fresh.run_id, remote_stale.run_id)}
        assert status == {live.run_id: "running", dead.run_id: "interrupted",
                          remote_fresh.run_id: "running", remote_stale.run_id: "interrupted"}
        assert reader.last_step(dead.run_id) == 30
    finally:
        reopened.dispose()
        for writer in (live, remote_fresh, remote_stale):
            writer.close()
        dead.close()  # the row is interrupted already; close() still finishes cleanly


def test_unreachable_database_is_one_clear_error() -> None:
    with pytest.raises(StoreError, match="cannot open database .*check that the server"):
        open_store("postgresql+psycopg://kvlab@127.0.0.1:1/nothing?connect_timeout=2")
    with pytest.raises(StoreError, match="cannot use database URL"):
        open_store("nonsense://")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_commands(trace_store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    writer = RunWriter(trace_store, FAKE_CONFIG, name="cli run")
    fake_run(writer, 20)
    writer.close()
    db = ["--db", trace_store.url]
    assert _cli(["runs", "--json", *db]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["name"], r["status"], r["steps"]) for r in listed] == [
        (writer.run_id, "cli run", "finished", 20)]
    assert set(listed[0]) == {"run_id", "name", "status", "steps", "created", "imported"}
    assert listed[0]["imported"] is False
    assert _cli(["export", str(writer.run_id), str(tmp_path / "t.zip"), *db]) == 0
    assert _cli(["import", str(tmp_path / "t.zip"), *db]) == 0
    new_id = int(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("run id: "))
    assert _cli(["delete", str(writer.run_id), *db]) == 0
    assert _cli(["runs", *db]) == 0
    out = capsys.readouterr().out
    assert "cli run" in out and f"{new_id:>5}" in out
    for argv, problem in ((["delete", "999", *db], "no run 999"),
                          (["export", "999", str(tmp_path / "x.zip"), *db], "no run 999"),
                          (["import", str(tmp_path / "missing.zip"), *db], "no such file")):
        assert _cli(argv) == 2
        err = capsys.readouterr().err
        assert problem in err and err.count("\n") == 1, err


def test_cli_py_wires_the_store_commands(trace_store, tmp_path: Path) -> None:
    writer = RunWriter(trace_store, FAKE_CONFIG, name="wired")
    writer.close()
    export_run(trace_store, writer.run_id, tmp_path / "ok.zip")
    out = subprocess.run([sys.executable, "cli.py", "runs", "--json", "--db", trace_store.url],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [r["name"] for r in json.loads(out.stdout)] == ["wired"]
    bad = tmp_path / "bad.zip"
    bad.write_text("garbage")
    out = subprocess.run([sys.executable, "cli.py", "import", str(bad), "--db", trace_store.url],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a kvlab trace file" in out.stderr


def test_schema_row_is_recorded(trace_store) -> None:
    with trace_store.engine.connect() as conn:
        version = conn.execute(text("SELECT version FROM kvlab_schema")).scalar_one()
    assert version == store_db.SCHEMA_VERSION
