"""Sweeps in the store (SQLite and PostgreSQL): the version-2 migration of a version-1
database, points' outcomes from their runs, driver claims, and the one-file export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import MetaData, Table, create_engine, inspect, update
from sqlalchemy.engine import make_url
from store_fixtures import (  # noqa: F401 (fixtures)
    FAKE_CONFIG,
    fake_run,
    fixture_db_url,
    fixture_make_db_url,
    fixture_trace_store,
)

from store import RunReader, RunWriter, StoreError, import_run, open_store
from store import db as store_db
from store import sweeps as store_sweeps
from store.db import utcnow
from store.liveness import process_start_time, this_host
from store.models import Run, Sweep

DATA = Path(__file__).resolve().parent / "data"
POINTS = [{"values": {"block_size": 8}, "repeat": 0}, {"values": {"block_size": 16}, "repeat": 0},
          {"values": {"block_size": 32}, "repeat": 0}]
SPEC = {"base": FAKE_CONFIG.to_dict(), "axes": [{"name": "block_size", "values": [8, 16, 32]}],
        "repeat": 1, "sample": None, "sample_seed": 0}


def make_v1_database(url: str) -> None:
    """A database as kvlab made it at schema version 1 (tests/data/schema_v1_*.sql), with one
    finished run in it."""
    dialect = "postgresql" if make_url(url).get_backend_name() == "postgresql" else "sqlite"
    ddl = (DATA / f"schema_v1_{dialect}.sql").read_text()
    code = "\n".join(line for line in ddl.splitlines() if not line.startswith("--"))
    statements = [s for s in code.split(";\n") if s.strip()]
    if dialect == "sqlite":
        Path(make_url(url).database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
            runs = Table("runs", MetaData(), autoload_with=conn)
            conn.execute(runs.insert().values(
                name="from v1", tags=["old"], config_json=FAKE_CONFIG.to_json(),
                status="finished", created_at=utcnow(), num_steps=0, summary={"steps": 0}))
    finally:
        engine.dispose()


def _schema(url: str) -> dict[str, object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            return {table: ({c["name"]: c["nullable"] for c in inspector.get_columns(table)},
                            sorted(i["name"] for i in inspector.get_indexes(table)))
                    for table in ("runs", "sweeps")}
    finally:
        engine.dispose()


def test_a_version_1_database_is_migrated_to_sweeps(make_db_url) -> None:
    old, fresh = make_db_url(), make_db_url()
    make_v1_database(old)
    store = open_store(old)
    try:
        assert store_db.schema_version(store) == store_db.SCHEMA_VERSION >= 4
        reader = RunReader(store)
        (old_run,) = reader.list_runs()["run_id"].tolist()
        assert reader.run_info(old_run).name == "from v1"
        sweep_id = store_sweeps.create_sweep(store, name="after", spec=SPEC, points=POINTS,
                                             point_errors={})
        writer = RunWriter(store, FAKE_CONFIG, sweep_id=sweep_id, sweep_point=1)
        fake_run(writer, 5)
        writer.close(summary={"steps": 5})
        points = store_sweeps.sweep_points(store, sweep_id)
        assert points["status"].tolist() == ["pending", "finished", "pending"]
    finally:
        store.dispose()
    open_store(fresh).dispose()
    assert _schema(old) == _schema(fresh)  # the migration made what a new database has


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _sweep(store, **errors: str) -> int:
    return store_sweeps.create_sweep(store, name="s", spec=SPEC, points=POINTS,
                                     point_errors={int(k[1:]): v for k, v in errors.items()})


def _run(store, sweep_id: int, point: int, *, error: str | None = None, steps: int = 5) -> int:
    writer = RunWriter(store, FAKE_CONFIG, sweep_id=sweep_id, sweep_point=point)
    fake_run(writer, steps)
    writer.close(summary=None if error else {"steps": steps, "output_tokens_per_s": 10.0 * point},
                 error=error)
    return writer.run_id


def test_a_point_reads_as_its_newest_run_or_its_recorded_error(trace_store) -> None:
    sweep_id = _sweep(trace_store, p2="invalid combination: num_blocks: too few")
    failed = _run(trace_store, sweep_id, 0, error="Traceback ...\nValueError: boom")
    retried = _run(trace_store, sweep_id, 0)
    df = store_sweeps.sweep_points(trace_store, sweep_id)
    assert df["status"].tolist() == ["finished", "pending", "failed"]
    assert df["run_id"].tolist()[0] == retried and failed < retried
    assert df["attempts"].tolist() == [2, 0, 0]
    assert df["block_size"].tolist() == [8, 16, 32]
    assert df["error"].tolist()[2].startswith("invalid combination")
    assert df.loc[0, "steps"] == 5
    assert store_sweeps.point_counts(df) == {"pending": 1, "running": 0, "finished": 1,
                                             "failed": 1, "interrupted": 0}
    only_failed = _sweep(trace_store)
    _run(trace_store, only_failed, 1, error="Traceback ...\nValueError: boom")
    df = store_sweeps.sweep_points(trace_store, only_failed)
    assert df["error"].tolist()[1] == "ValueError: boom"  # the traceback's last line
    listing = store_sweeps.list_sweeps(trace_store)
    assert listing["sweep_id"].tolist() == [only_failed, sweep_id]
    assert listing[["finished", "failed", "pending"]].values.tolist() == [[0, 1, 2], [1, 1, 1]]


def test_orphan_runs_are_closed_and_point_errors_set_and_cleared(trace_store) -> None:
    sweep_id = _sweep(trace_store)
    orphan = _run(trace_store, sweep_id, 1)
    with trace_store.write() as conn:  # as a killed worker leaves it
        conn.execute(update(Run).where(Run.id == orphan).values(status="running"))
    assert store_sweeps.close_orphan_runs(trace_store, sweep_id, "failed", "worker died",
                                          points=[0]) == []
    assert store_sweeps.close_orphan_runs(trace_store, sweep_id, "failed", "worker died") == [
        orphan]
    store_sweeps.set_point_errors(trace_store, sweep_id, {2: "worker died", 0: "x"})
    store_sweeps.set_point_errors(trace_store, sweep_id, {0: None})
    df = store_sweeps.sweep_points(trace_store, sweep_id)
    assert df["status"].tolist() == ["pending", "failed", "failed"]
    assert df["error"].tolist()[1:] == ["worker died", "worker died"]


def test_a_sweep_driven_by_another_live_process_cannot_be_claimed(trace_store) -> None:
    sweep_id = _sweep(trace_store)
    assert store_sweeps.claim_sweep(trace_store, sweep_id).status == "running"  # ours
    parent = os.getppid()
    with trace_store.write() as conn:
        conn.execute(update(Sweep).where(Sweep.id == sweep_id).values(
            driver_pid=parent, driver_host=this_host(), driver_started=process_start_time(parent)))
    with pytest.raises(StoreError, match="still being run by another process"):
        store_sweeps.claim_sweep(trace_store, sweep_id)
    with trace_store.write() as conn:  # a driver that was killed: the sweep reads interrupted
        conn.execute(update(Sweep).where(Sweep.id == sweep_id).values(driver_pid=_dead_pid()))
    assert store_sweeps.sweep_info(trace_store, sweep_id).status == "interrupted"
    assert store_sweeps.list_sweeps(trace_store)["status"].tolist() == ["interrupted"]
    assert store_sweeps.claim_sweep(trace_store, sweep_id).status == "running"
    with pytest.raises(StoreError, match="no sweep 999"):
        store_sweeps.sweep_info(trace_store, 999)


def test_a_sweep_exports_as_one_file_with_every_run(trace_store, make_db_url,
                                                    tmp_path: Path) -> None:
    sweep_id = _sweep(trace_store, p2="invalid")
    runs = [_run(trace_store, sweep_id, 0, error="boom"), _run(trace_store, sweep_id, 0),
            _run(trace_store, sweep_id, 1, steps=12)]
    store_sweeps.end_sweep(trace_store, sweep_id, "finished")
    path = store_sweeps.export_sweep(trace_store, sweep_id, tmp_path / "sweep.zip")
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert manifest["format"] == "kvlab-sweep" and manifest["sweep"]["status"] == "finished"
        assert [r["run_id"] for r in manifest["runs"]] == runs
        assert [r["point"] for r in manifest["runs"]] == [0, 0, 1]
        assert manifest["sweep"]["point_errors"] == {"2": "invalid"}
        assert "block_size" in archive.read("points.csv").decode().splitlines()[0]
        (tmp_path / "run.kvtrace.zip").write_bytes(archive.read(manifest["runs"][2]["file"]))
    other = open_store(make_db_url())
    try:
        copied = import_run(other, tmp_path / "run.kvtrace.zip")
        assert RunReader(other).run_info(copied).num_steps == 12
    finally:
        other.dispose()
    with pytest.raises(StoreError, match="does not exist"):
        store_sweeps.export_sweep(trace_store, sweep_id, tmp_path / "nope" / "x.zip")
