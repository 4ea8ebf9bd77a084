"""The portable trace file: one run in one file, so a GPU box can record and a laptop replay.

Format (`FORMAT_VERSION` 4): a zip archive (suggested name `run-<id>.kvtrace.zip`) holding

- `manifest.json`: `{"format": "kvlab-trace", "format_version": 4, "exported_at": ISO time,
  "run": {name, tags, status, config (the RunConfig as a JSON object), summary, error, device,
  model, created_at, finished_at, num_steps}, "tables": {TABLE: {"file": "TABLE.parquet",
  "rows": N, "sha256": hex digest of the file}}}` (files exported before checksums lack
  "sha256" and still import: the checksum is optional in every format version, since older
  readers ignore it)
- one Parquet file (zstd) per table, columns as in `SCHEMAS` below: `steps` (StepRecord fields),
  `block_events` (BlockEvent fields, kind as its name), `request_events` (RequestEvent fields),
  `requests` (RequestRecord fields), `keyframes` (Keyframe fields: step and the per-block
  lists), and from version 4 `telemetry` (host/GPU samples). Event order within a step is row
  order. A column that a newer kvlab added is filled with its field's default when an older file
  lacks it.

Reading validates everything before anything is written to a database: the format name and
version, the manifest's run fields and config, entry names (no `../` or absolute paths), each
table's presence, checksum, required columns and types, row counts against the manifest, event
kinds and keyframe arrays, and a size cap against decompression bombs (the sizes the archive
declares, which also bound what reading inflates: zipfile stops at a member's declared size).
A bad file raises `StoreError` naming the problem.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import ConfigError, RunConfig
from engine.trace import (
    BLOCK_EVENT_KINDS,
    REQUEST_EVENT_KINDS,
    BlockEvent,
    Keyframe,
    RequestEvent,
    RequestRecord,
    StepRecord,
    TelemetrySample,
)
from store.errors import StoreError
from store.trace_columns import arrow_schema, trace_columns

FORMAT = "kvlab-trace"
# 2: block events carry `group_id` and keyframes `groups` (KV cache groups); a version 1 file
# lacks both and imports with the defaults (everything in group 0). 3: retention policies'
# `drop` events and their `reason` (older files have neither). 4: the `telemetry` table (the
# device sampler's readings; steps gain `roofline_s`); older files import with none.
FORMAT_VERSION = 4
ADDED_TABLES = {"telemetry": 4}  # table -> the format version that introduced it
MAX_UNCOMPRESSED_BYTES = 8 * 1024**3
RUN_FIELDS = ("name", "tags", "status", "config", "summary", "error", "device", "model",
              "created_at", "finished_at", "num_steps")
RUN_STATUSES = ("running", "finished", "failed", "interrupted")  # as store.models
# What a damaged archive can raise inside zipfile (StoreError, a RuntimeError, is re-raised).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error,
                   NotImplementedError, RuntimeError, ValueError)

# The Parquet schema of each table, from the trace dataclasses (store.trace_columns). Events
# keep their kind as its name; the database's ordinals are row order here.
TABLE_TYPES: dict[str, type] = {"steps": StepRecord, "block_events": BlockEvent,
                                "request_events": RequestEvent, "requests": RequestRecord,
                                "keyframes": Keyframe, "telemetry": TelemetrySample}
SCHEMAS: dict[str, pa.Schema] = {name: arrow_schema(cls) for name, cls in TABLE_TYPES.items()}


@dataclass
class TraceFile:
    """A validated trace: the manifest's run fields and one Arrow table per SCHEMAS entry."""

    run: dict[str, Any]
    tables: dict[str, pa.Table]


def write_trace_file(path: str | Path, trace: TraceFile, exported_at: str) -> None:
    """Write atomically (temp file + rename) so a failed export leaves no half file behind."""
    path = Path(path)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "exported_at": exported_at,
                "run": trace.run,
                "tables": {name: {"file": f"{name}.parquet", "rows": trace.tables[name].num_rows}
                           for name in SCHEMAS}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        files = {}
        for name, schema in SCHEMAS.items():
            buffer = io.BytesIO()
            pq.write_table(trace.tables[name].cast(schema), buffer, compression="zstd")
            files[name] = buffer.getvalue()
            manifest["tables"][name]["sha256"] = hashlib.sha256(files[name]).hexdigest()
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1, default=str))
            for name, data in files.items():
                zf.writestr(f"{name}.parquet", data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_trace_file(path: str | Path,
                    max_bytes: int = MAX_UNCOMPRESSED_BYTES) -> TraceFile:
    """Read and validate a trace file; `max_bytes` caps what its members may unpack to."""
    path = Path(path)
    where = f"{path}"
    if not path.is_file():
        raise StoreError(f"{where}: no such file; give the path of a file made by "
                         "`python cli.py export`")
    if not zipfile.is_zipfile(path):
        raise StoreError(f"{where}: not a kvlab trace file (not a zip archive); export the run "
                         "again with `python cli.py export`")
    try:
        with zipfile.ZipFile(path) as zf:
            _check_entries(zf, where, max_bytes)
            manifest = _read_manifest(zf, where)
            tables = {name: _read_table(zf, where, name, manifest["tables"])
                      if manifest["format_version"] >= ADDED_TABLES.get(name, 1)
                      else SCHEMAS[name].empty_table() for name in SCHEMAS}
    except StoreError:
        raise
    except _ARCHIVE_ERRORS as exc:
        raise StoreError(f"{where}: the archive is damaged ({_one_line(exc)}); export the run "
                         "again") from exc
    _check_contents(where, tables)
    return TraceFile(manifest["run"], tables)


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _check_entries(zf: zipfile.ZipFile, where: str, max_bytes: int) -> None:
    infos = zf.infolist()
    unsafe = [i.filename for i in infos if i.filename.startswith(("/", "\\"))
              or ".." in i.filename.replace("\\", "/").split("/")]
    if unsafe:
        raise StoreError(f"{where}: holds an entry named {unsafe[0][:80]!r} that points outside "
                         "the archive; refusing it as a likely hostile file")
    if sum(info.file_size for info in infos) > max_bytes:
        raise StoreError(f"{where}: unpacks to more than {max_bytes:,} bytes; refusing it as a "
                         "likely corrupt or hostile file")


def _read_manifest(zf: zipfile.ZipFile, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(zf.read("manifest.json"))
    except KeyError as exc:
        raise StoreError(f"{where}: no manifest.json; not a kvlab trace file") from exc
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise StoreError(f"{where}: manifest.json is not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{where}: manifest says this is not a {FORMAT} file")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise StoreError(f"{where}: manifest has no valid format_version")
    if version > FORMAT_VERSION:
        raise StoreError(f"{where}: trace format version {version} is newer than this kvlab "
                         f"reads ({FORMAT_VERSION}); upgrade kvlab to import it")
    run, tables = manifest.get("run"), manifest.get("tables")
    if not isinstance(run, dict) or not isinstance(tables, dict):
        raise StoreError(f"{where}: manifest lacks its 'run' or 'tables' section")
    missing = [name for name in RUN_FIELDS if name not in run]
    if missing:
        raise StoreError(f"{where}: manifest's run lacks {missing}")
    _check_run(run, where)
    try:
        RunConfig.from_dict(run["config"])
    except (ConfigError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise StoreError(f"{where}: the run's config is invalid here ({_one_line(exc)})") from exc
    return manifest


def _check_run(run: dict[str, Any], where: str) -> None:
    """The run fields' types, so inserting them cannot fail halfway or store nonsense."""
    def bad(name: str, expected: str) -> StoreError:
        return StoreError(f"{where}: manifest's run field {name!r} must be {expected}")

    for name in ("name", "error", "device", "model", "finished_at"):
        if run[name] is not None and not isinstance(run[name], str):
            raise bad(name, "a string or null")
    if not isinstance(run["created_at"], str):
        raise bad("created_at", "an ISO date string")
    if run["status"] not in RUN_STATUSES:
        raise bad("status", f"one of {', '.join(RUN_STATUSES)}")
    tags = run["tags"]
    if tags is not None and (not isinstance(tags, list)
                             or not all(isinstance(t, str) for t in tags)):
        raise bad("tags", "a list of strings")
    if run["summary"] is not None and not isinstance(run["summary"], dict):
        raise bad("summary", "an object or null")
    steps = run["num_steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 2**31:
        raise bad("num_steps", "a whole number of steps")
    if not isinstance(run["config"], dict):
        raise bad("config", "an object (a RunConfig)")


def _read_table(zf: zipfile.ZipFile, where: str, name: str,
                listed: dict[str, Any]) -> pa.Table:
    entry = listed.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("rows"), int):
        raise StoreError(f"{where}: manifest lists no row count for table {name!r}")
    try:
        data = zf.read(f"{name}.parquet")
    except KeyError as exc:
        raise StoreError(f"{where}: table file {name}.parquet is missing") from exc
    digest = entry.get("sha256")
    if digest is not None and digest != hashlib.sha256(data).hexdigest():
        raise StoreError(f"{where}: {name}.parquet does not match its sha256 in the manifest; "
                         "the file is damaged or edited, export the run again")
    try:  # checked before parsing: a damaged file with a checksum never reaches the parser
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, MemoryError) as exc:
        raise StoreError(f"{where}: {name}.parquet is unreadable ({_one_line(exc)})") from exc
    schema = SCHEMAS[name]
    table = _add_defaults(table, name)
    missing = [col for col in schema.names if col not in table.column_names]
    if missing:
        raise StoreError(f"{where}: {name}.parquet lacks required columns {missing}")
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowException, ValueError) as exc:
        raise StoreError(f"{where}: {name}.parquet has columns of the wrong type "
                         f"({_one_line(exc)})") from exc
    if table.num_rows != entry["rows"]:
        raise StoreError(f"{where}: {name}.parquet has {table.num_rows} rows but the manifest "
                         f"says {entry['rows']}; the file is truncated or edited")
    return table


def _add_defaults(table: pa.Table, name: str) -> pa.Table:
    """Columns of fields added after a file was written, filled with the fields' defaults."""
    for column in trace_columns(TABLE_TYPES[name]):
        if column.name not in table.column_names and column.has_default:
            values = pa.array([column.default] * table.num_rows,
                              type=SCHEMAS[name].field(column.name).type)
            table = table.append_column(column.name, values)
    return table


def _check_contents(where: str, tables: dict[str, pa.Table]) -> None:
    for name, kinds in (("block_events", BLOCK_EVENT_KINDS), ("request_events",
                                                              REQUEST_EVENT_KINDS)):
        bad = set(tables[name].column("kind").to_pylist()) - set(kinds)
        if bad:
            raise StoreError(f"{where}: {name} has unknown kinds {sorted(map(str, bad))}")
    for name, key in (("steps", "step"), ("keyframes", "step")):
        values = tables[name].column(key).to_pylist()
        if None in values or len(set(values)) != len(values):
            raise StoreError(f"{where}: {name} has missing or repeated {key} values")
    for kf in tables["keyframes"].to_pylist():
        arrays = [kf[k] for k in ("ref_counts", "block_hashes", "owners")]
        if any(a is None for a in arrays) or None in kf["ref_counts"] or None in (
                kf["free_queue"] or []):
            raise StoreError(f"{where}: keyframe at step {kf['step']} has missing values")
        n = len(kf["ref_counts"])
        groups = kf["groups"] or []  # empty in version 1 files: derived on import
        if len(kf["block_hashes"]) != n or len(kf["owners"]) != n or len(groups) not in (0, n):
            raise StoreError(f"{where}: keyframe at step {kf['step']} has arrays of different "
                             "lengths")
