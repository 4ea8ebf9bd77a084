"""Moving runs in and out of a database: export to a trace file, import, delete.

The file format is described in store.trace_file. Import validates the whole file first and
then inserts the run in one transaction under a new run id, so a bad file or a failure halfway
leaves the database as it was. The run row keeps the SHA-256 of the file's bytes: it marks the
run as imported, and a second import of the same file is refused (two identical runs with
nothing to tell them apart) unless a copy is asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from sqlalchemy import Connection, delete, func, insert, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from engine.trace import BLOCK_EVENT_KINDS, REQUEST_EVENT_KINDS, Keyframe
from store.db import Store, utcnow
from store.errors import DuplicateImportError, StoreError
from store.keyframes import encode_keyframe
from store.liveness import writer_alive
from store.models import (
    CHILD_TABLES,
    RUNS,
    SUMMARY_COLUMNS,
    BlockEventRow,
    KeyframeRow,
    RequestEventRow,
    RequestRow,
    Run,
    Step,
    TelemetryRow,
)
from store.reader import RunReader
from store.trace_file import (
    MAX_UNCOMPRESSED_BYTES,
    SCHEMAS,
    TraceFile,
    read_trace_file,
    write_trace_file,
)

_INSERT_CHUNK = 20_000
NAME_MAX_CHARS = 200  # the runs.name column's width


def export_run(store: Store, run_id: int, path: str | Path) -> Path:
    """Write run `run_id` to `path` (see store.trace_file); returns the path."""
    # One read transaction: a run still being written exports as one consistent prefix.
    with RunReader(store).snapshot() as reader:
        info = reader.run_info(run_id)
        keyframes = reader.keyframes(run_id)
        frames = {"steps": reader.steps(run_id), "block_events": reader.block_events(run_id),
                  "request_events": reader.request_events(run_id),
                  "requests": reader.requests(run_id), "telemetry": reader.telemetry(run_id)}
    tables = {name: pa.Table.from_pandas(df, schema=SCHEMAS[name], preserve_index=False)
              for name, df in frames.items()}
    tables["keyframes"] = pa.Table.from_pylist([dataclasses.asdict(k) for k in keyframes],
                                               schema=SCHEMAS["keyframes"])
    run = {"name": info.name, "tags": info.tags, "status": info.status,
           "config": json.loads(info.config.to_json()), "summary": info.summary,
           "error": info.error, "device": info.device, "model": info.model,
           "created_at": _iso(info.created_at), "finished_at": _iso(info.finished_at),
           "num_steps": info.num_steps}
    path = Path(path)
    if not path.parent.is_dir():
        raise StoreError(f"cannot export to {path}: folder {path.parent} does not exist")
    write_trace_file(path, TraceFile(run, tables), exported_at=_iso(utcnow()) or "")
    return path


def import_run(store: Store, path: str | Path, *, allow_copy: bool = False,
               max_bytes: int = MAX_UNCOMPRESSED_BYTES) -> int:
    """Validate and insert the run in `path`; returns its new run id.

    A file whose bytes were imported before is refused with DuplicateImportError (nothing
    written) unless `allow_copy`; a copy records the same hash, so later imports still find
    the first run. `max_bytes` caps what the archive may unpack to (a zip bomb is refused
    before anything is inflated).
    """
    trace = read_trace_file(path, max_bytes=max_bytes)
    digest = file_sha256(path)
    values = {**_run_values(trace.run), "import_sha256": digest}
    try:
        with store.write() as conn:
            existing = _imported_as(conn, digest)
            if existing is not None and not allow_copy:
                raise DuplicateImportError(
                    f"{path}: already imported as run {existing} (same file contents); nothing "
                    "was changed; to add a second copy anyway use `python cli.py import FILE "
                    "--copy`", existing)
            run_id = conn.execute(insert(Run).values(**values).returning(Run.id)).scalar_one()
            for model, rows in _child_rows(run_id, trace.tables):
                for start in range(0, len(rows), _INSERT_CHUNK):
                    conn.execute(insert(model), rows[start:start + _INSERT_CHUNK])
    except SQLAlchemyError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise StoreError(f"{path}: could not be imported ({reason}); nothing was changed") from exc
    return run_id


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _imported_as(conn: Connection, digest: str) -> int | None:
    """The first run imported from a file with this hash, if any.

    Called inside the import's write transaction: on SQLite BEGIN IMMEDIATE already serialises
    writers; on PostgreSQL an advisory lock per hash makes two simultaneous imports of one file
    take turns, so the second sees the first's row.
    """
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(bytes.fromhex(digest[:16]), "big", signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    return conn.execute(select(func.min(Run.id)).where(Run.import_sha256 == digest)).scalar()


def delete_run(store: Store, run_id: int) -> None:
    """Remove the run and all its rows (one transaction). A live run must be stopped first."""
    with store.write() as conn:
        run = conn.execute(select(RUNS).where(Run.id == run_id)).one_or_none()
        if run is None:
            raise StoreError(f"no run {run_id} in {store.display_url}; list the runs with "
                             "`python cli.py runs`")
        if run.status == "running" and writer_alive(run.writer_pid, run.writer_host,
                                                    run.writer_started, run.heartbeat_at,
                                                    utcnow()):
            raise StoreError(f"run {run_id} is still being written by process {run.writer_pid} "
                             f"on {run.writer_host}; stop that run first, then delete it")
        _delete_rows(conn, run_id)


def rename_run(store: Store, run_id: int, name: str | None) -> None:
    """Set the run's name (None or blank: no name). Safe while the run is being written: the
    writer never updates the name after it inserted the row."""
    name = (name or "").strip() or None
    if name is not None and len(name) > NAME_MAX_CHARS:
        raise StoreError(f"a run name has at most {NAME_MAX_CHARS} characters; this one has "
                         f"{len(name)}")
    with store.write() as conn:
        done = conn.execute(update(Run).where(Run.id == run_id).values(name=name))
        if done.rowcount == 0:
            raise StoreError(f"no run {run_id} in {store.display_url}; list the runs with "
                             "`python cli.py runs`")


def _delete_rows(conn: Connection, run_id: int) -> None:
    # Explicit deletes rather than ON DELETE CASCADE: SQLite only cascades with its
    # foreign_keys pragma on, and a database may have been opened without it.
    for model in CHILD_TABLES:
        conn.execute(delete(model).where(model.run_id == run_id))
    conn.execute(delete(Run).where(Run.id == run_id))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _run_values(run: dict[str, Any]) -> dict[str, Any]:
    summary = run["summary"] or None
    status = run["status"]
    if status == "running":  # exported mid-run: nobody will ever finish the copy
        status = "interrupted"
    try:
        created = datetime.fromisoformat(run["created_at"])
        finished = datetime.fromisoformat(run["finished_at"]) if run["finished_at"] else None
    except (TypeError, ValueError) as exc:
        raise StoreError(f"the trace file's run times are not ISO dates ({exc})") from exc
    values = dict(name=run["name"], tags=list(run["tags"] or []),
                  config_json=json.dumps(run["config"], sort_keys=True), status=status,
                  device=run["device"], model=run["model"], created_at=created,
                  finished_at=finished, heartbeat_at=None, num_steps=int(run["num_steps"]),
                  error=run["error"], summary=summary)
    values.update({k: summary.get(k) for k in SUMMARY_COLUMNS} if summary else {})
    return values


def _with_ordinals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ordinal = position within the step (rows are in emission order)."""
    counts: dict[int, int] = {}
    for row in rows:
        row["ordinal"] = counts.get(row["step"], 0)
        counts[row["step"]] = row["ordinal"] + 1
    return rows


def _child_rows(run_id: int, tables: dict[str, pa.Table]) -> list[tuple[type, list[dict]]]:
    block_code = {k: i for i, k in enumerate(BLOCK_EVENT_KINDS)}
    request_code = {k: i for i, k in enumerate(REQUEST_EVENT_KINDS)}
    steps = [{"run_id": run_id, **r} for r in tables["steps"].to_pylist()]
    blocks = _with_ordinals([{"run_id": run_id, **r, "kind": block_code[r["kind"]]}
                             for r in tables["block_events"].to_pylist()])
    request_events = _with_ordinals([{"run_id": run_id, **r, "kind": request_code[r["kind"]]}
                                     for r in tables["request_events"].to_pylist()])
    requests = [{"run_id": run_id, "ordinal": i, **r}
                for i, r in enumerate(tables["requests"].to_pylist())]
    telemetry = [{"run_id": run_id, "ordinal": i, **r}
                 for i, r in enumerate(tables["telemetry"].to_pylist())]
    keyframes = []
    for r in tables["keyframes"].to_pylist():
        keyframe = Keyframe(r["step"], r["ref_counts"], r["block_hashes"], r["owners"],
                            r["free_queue"] or [], r["groups"] or [])
        keyframes.append({"run_id": run_id, "step": keyframe.step,
                          "num_blocks": len(keyframe.ref_counts),
                          "data": encode_keyframe(keyframe)})
    return [(TelemetryRow, telemetry), (Step, steps), (BlockEventRow, blocks),
            (RequestEventRow, request_events),
            (RequestRow, requests), (KeyframeRow, keyframes)]
