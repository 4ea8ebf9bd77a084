"""The portable trace file: one run in one file, so a GPU box can record and a laptop replay.

Format (`FORMAT_VERSION` 3): a zip archive (suggested name `run-<id>.kvtrace.zip`) holding

- `manifest.json`: `{"format": "kvlab-trace", "format_version": 3, "exported_at": ISO time,
  "run": {name, tags, status, config (the RunConfig as a JSON object), summary, error, device,
  model, created_at, finished_at, num_steps}, "tables": {TABLE: {"file": "TABLE.parquet",
  "rows": N}}}`
- one Parquet file (zstd) per table, columns as in `SCHEMAS` below: `steps` (StepRecord fields),
  `block_events` (BlockEvent fields, kind as its name), `request_events` (RequestEvent fields),
  `requests` (RequestRecord fields), `keyframes` (Keyframe fields: step and the per-block
  lists). Event order within a step is row order. A column that a newer kvlab added is filled
  with its field's default when an older file lacks it.

Reading validates everything before anything is written to a database: the format name and
version, the manifest's run fields and config, each table's presence, required columns and
types, row counts against the manifest, event kinds and keyframe array lengths, and a size cap
against decompression bombs. A bad file raises `StoreError` naming the problem.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
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
)
from store.errors import StoreError
from store.trace_columns import arrow_schema, trace_columns

FORMAT = "kvlab-trace"
# 2: block events carry `group_id` and keyframes `groups` (KV cache groups); a version 1 file
# lacks both and imports with the defaults (everything in group 0). 3: retention policies'
# `drop` events and their `reason` (older files have neither).
FORMAT_VERSION = 3
MAX_UNCOMPRESSED_BYTES = 8 * 1024**3
RUN_FIELDS = ("name", "tags", "status", "config", "summary", "error", "device", "model",
              "created_at", "finished_at", "num_steps")

# The Parquet schema of each table, from the trace dataclasses (store.trace_columns). Events
# keep their kind as its name; the database's ordinals are row order here.
TABLE_TYPES: dict[str, type] = {"steps": StepRecord, "block_events": BlockEvent,
                                "request_events": RequestEvent, "requests": RequestRecord,
                                "keyframes": Keyframe}
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
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1, default=str))
            for name, schema in SCHEMAS.items():
                buffer = io.BytesIO()
                pq.write_table(trace.tables[name].cast(schema), buffer, compression="zstd")
                zf.writestr(f"{name}.parquet", buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_trace_file(path: str | Path) -> TraceFile:
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
            if sum(info.file_size for info in zf.infolist()) > MAX_UNCOMPRESSED_BYTES:
                raise StoreError(f"{where}: unpacks to more than {MAX_UNCOMPRESSED_BYTES} bytes; "
                                 "refusing it as a likely corrupt or hostile file")
            manifest = _read_manifest(zf, where)
            tables = {name: _read_table(zf, where, name, manifest["tables"])
                      for name in SCHEMAS}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise StoreError(f"{where}: the archive is damaged ({exc}); export the run again") from exc
    _check_contents(where, tables)
    return TraceFile(manifest["run"], tables)


def _read_manifest(zf: zipfile.ZipFile, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(zf.read("manifest.json"))
    except KeyError as exc:
        raise StoreError(f"{where}: no manifest.json; not a kvlab trace file") from exc
    except ValueError as exc:
        raise StoreError(f"{where}: manifest.json is not valid JSON ({exc})") from exc
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
    try:
        RunConfig.from_dict(run["config"])
    except (ConfigError, TypeError, ValueError, AttributeError) as exc:
        raise StoreError(f"{where}: the run's config is invalid here ({exc})") from exc
    return manifest


def _read_table(zf: zipfile.ZipFile, where: str, name: str,
                listed: dict[str, Any]) -> pa.Table:
    entry = listed.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("rows"), int):
        raise StoreError(f"{where}: manifest lists no row count for table {name!r}")
    try:
        table = pq.read_table(io.BytesIO(zf.read(f"{name}.parquet")))
    except KeyError as exc:
        raise StoreError(f"{where}: table file {name}.parquet is missing") from exc
    except (pa.ArrowException, OSError) as exc:
        raise StoreError(f"{where}: {name}.parquet is unreadable ({exc})") from exc
    schema = SCHEMAS[name]
    table = _add_defaults(table, name)
    missing = [col for col in schema.names if col not in table.column_names]
    if missing:
        raise StoreError(f"{where}: {name}.parquet lacks required columns {missing}")
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowException, ValueError) as exc:
        raise StoreError(f"{where}: {name}.parquet has columns of the wrong type ({exc})") from exc
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
        n = len(kf["ref_counts"] or [])
        groups = kf["groups"] or []  # empty in version 1 files: derived on import
        if (len(kf["block_hashes"] or []) != n or len(kf["owners"] or []) != n
                or len(groups) not in (0, n)):
            raise StoreError(f"{where}: keyframe at step {kf['step']} has arrays of different "
                             "lengths")
