"""Importing the same trace file twice: refused (nothing written) unless a copy is asked for;
imported runs are marked; schema version 3 adds the hash column to older databases."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import func, inspect, select, text, update
from store_fixtures import (  # noqa: F401 (fixtures)
    FAKE_CONFIG,
    ROOT,
    fake_run,
    fixture_db_url,
    fixture_make_db_url,
    fixture_trace_store,
)

from store import (
    DuplicateImportError,
    RunReader,
    RunWriter,
    StoreError,
    delete_run,
    export_run,
    import_run,
    open_store,
)
from store import db as store_db
from store.models import CHILD_TABLES, SchemaInfo


def recorded(store, steps: int = 25, name: str = "recorded") -> int:
    writer = RunWriter(store, FAKE_CONFIG, name=name)
    fake_run(writer, steps)
    writer.close(summary={"steps": steps})
    return writer.run_id


def row_counts(store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {m.__table__.name: conn.execute(select(func.count()).select_from(m)).scalar()
                for m in CHILD_TABLES}


def test_a_second_import_of_the_same_file_is_refused(trace_store, tmp_path: Path) -> None:
    source = recorded(trace_store)
    path = export_run(trace_store, source, tmp_path / "run.kvtrace.zip")
    first = import_run(trace_store, path)
    before_runs, before_rows = RunReader(trace_store).list_runs(), row_counts(trace_store)
    renamed = tmp_path / "renamed.zip"  # the contents count, not the name
    renamed.write_bytes(path.read_bytes())
    for again in (path, renamed):
        with pytest.raises(DuplicateImportError, match=f"already imported as run {first}") as e:
            import_run(trace_store, again)
        assert e.value.run_id == first and isinstance(e.value, StoreError)
        assert "--copy" in str(e.value)
    pd.testing.assert_frame_equal(RunReader(trace_store).list_runs(), before_runs)
    assert row_counts(trace_store) == before_rows


def test_a_copy_on_request_and_the_imported_mark(trace_store, tmp_path: Path) -> None:
    source = recorded(trace_store)
    path = export_run(trace_store, source, tmp_path / "run.kvtrace.zip")
    first = import_run(trace_store, path)
    copy = import_run(trace_store, path, allow_copy=True)
    assert copy not in (source, first)
    reader = RunReader(trace_store)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert reader.run_info(first).import_sha256 == digest == reader.run_info(copy).import_sha256
    assert reader.run_info(first).imported and not reader.run_info(source).imported
    runs = reader.list_runs().set_index("run_id")
    assert runs.loc[[source, first, copy], "imported"].tolist() == [False, True, True]
    assert reader.steps(copy).equals(reader.steps(first))
    # a later import names the first run; once both are deleted the file imports again
    with pytest.raises(DuplicateImportError, match=f"as run {first}"):
        import_run(trace_store, path)
    delete_run(trace_store, first)
    with pytest.raises(DuplicateImportError, match=f"as run {copy}"):
        import_run(trace_store, path)
    delete_run(trace_store, copy)
    assert reader.run_info(import_run(trace_store, path)).imported


def test_another_file_of_the_same_run_is_not_a_duplicate(trace_store, tmp_path: Path) -> None:
    """Two exports of one run differ (export time in the manifest): each is a new file."""
    source = recorded(trace_store)
    a = export_run(trace_store, source, tmp_path / "a.kvtrace.zip")
    b = export_run(trace_store, source, tmp_path / "b.kvtrace.zip")
    assert a.read_bytes() != b.read_bytes()
    assert import_run(trace_store, a) != import_run(trace_store, b)


def test_cli_import_refuses_a_duplicate_and_copies_on_request(trace_store,
                                                               tmp_path: Path) -> None:
    source = recorded(trace_store, name="via cli")
    path = export_run(trace_store, source, tmp_path / "run.kvtrace.zip")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "cli.py", *args, "--db", trace_store.url],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    first = cli("import", str(path))
    assert first.returncode == 0, first.stderr
    first_id = int(first.stdout.strip().removeprefix("run id: "))
    again = cli("import", str(path))
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1
    assert f"already imported as run {first_id}" in again.stderr and "--copy" in again.stderr
    copy = cli("import", str(path), "--copy")
    assert copy.returncode == 0, copy.stderr
    listed = cli("runs", "--json")
    marks = {r["run_id"]: r["imported"] for r in json.loads(listed.stdout)}
    copy_id = int(copy.stdout.strip().removeprefix("run id: "))
    assert marks == {source: False, first_id: True, copy_id: True}
    table = cli("runs").stdout.splitlines()
    assert sum(line.endswith("via cli (imported)") for line in table) == 2


def test_the_migration_adds_the_hash_to_an_older_database(db_url: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A database from before the import hash (its column and index dropped, its version set
    back) migrates: its runs read as recorded here and imports are checked from then on. Only
    this step runs, whatever number it has among the migrations."""
    version = next(v for v, step in store_db.MIGRATIONS.items()
                   if step is store_db._migrate_add_import_hash)
    store = open_store(db_url)
    source = recorded(store)
    with store.write() as conn:
        conn.execute(text("DROP INDEX ix_runs_import_sha256"))
        conn.execute(text("ALTER TABLE runs DROP COLUMN import_sha256"))
        conn.execute(update(SchemaInfo).values(version=version - 1))
    store.dispose()
    monkeypatch.setattr(store_db, "SCHEMA_VERSION", version)
    monkeypatch.setattr(store_db, "MIGRATIONS", {version: store_db._migrate_add_import_hash})
    store = open_store(db_url)
    try:
        assert store_db.schema_version(store) == version
        with store.engine.connect() as conn:
            indexes = {i["name"] for i in inspect(conn).get_indexes("runs")}
        assert "ix_runs_import_sha256" in indexes
        reader = RunReader(store)
        assert reader.list_runs()["imported"].tolist() == [False]
        path = export_run(store, source, tmp_path / "old.kvtrace.zip")
        imported = import_run(store, path)
        assert reader.run_info(imported).imported
        with pytest.raises(DuplicateImportError):
            import_run(store, path)
    finally:
        store.dispose()
