"""ORM models: one row per run, and the run's steps, events, requests and keyframes.

Child tables have composite primary keys that start with `(run_id, step)`, so the key itself is
the index Replay and Compare need: "the events of run R between steps a and b" is one range scan.
On SQLite they are `WITHOUT ROWID` tables (clustered on that key), which also saves the separate
rowid b-tree.

The trace tables' columns are not written out here: they come from the engine's trace
dataclasses (store.trace_columns), so a new trace field needs only a migration.

Event kinds are stored as small integers (index into `BLOCK_EVENT_KINDS` /
`REQUEST_EVENT_KINDS`): events are by far the most numerous rows, and a 1-byte code instead of a
word keeps the database small. The reader maps them back to names.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from engine.quality_result import QualityResult
from engine.trace import BlockEvent, RequestEvent, RequestRecord, StepRecord, TelemetrySample
from store.trace_columns import sql_columns

RUN_STATUSES = ("running", "finished", "failed", "interrupted")

# Clustered storage for the big append-only tables on SQLite; other dialects ignore the option.
_CLUSTERED = {"sqlite_with_rowid": False}


class Base(DeclarativeBase):
    pass


def _run_fk() -> Mapped[int]:
    return mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)


class SchemaInfo(Base):
    """One row: the schema version this database is at (see `store.db.MIGRATIONS`)."""

    __tablename__ = "kvlab_schema"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class Run(Base):
    """A run. Status moves running -> finished | failed | interrupted.

    `writer_pid`/`writer_host`/`writer_started` identify the process writing a `running` run, so
    opening the store can tell a live writer from one that was killed (see store.liveness).
    `heartbeat_at` is refreshed by the writer and covers writers on other hosts.
    `num_steps` is the last committed step, updated in the same transaction as the steps.
    `import_sha256` is the SHA-256 of the trace file a run was imported from (None for a run
    recorded here): it marks the run as imported and lets a second import of the same file be
    refused (store.portable.import_run).
    """

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    config_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    device: Mapped[str | None] = mapped_column(String(100))
    model: Mapped[str | None] = mapped_column(String(100), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    num_steps: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    writer_pid: Mapped[int | None] = mapped_column(Integer)
    writer_host: Mapped[str | None] = mapped_column(String(255))
    writer_started: Mapped[float | None] = mapped_column(Float)
    import_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    # Headline figures copied out of the summary so runs can be sorted/filtered in SQL;
    # the whole RunSummary lives in `summary`.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    elapsed_s: Mapped[float | None] = mapped_column(Float)
    output_tokens_per_s: Mapped[float | None] = mapped_column(Float)
    prefix_hit_rate: Mapped[float | None] = mapped_column(Float)
    peak_blocks_used: Mapped[int | None] = mapped_column(Integer)
    num_preemptions: Mapped[int | None] = mapped_column(Integer)
    num_evictions: Mapped[int | None] = mapped_column(Integer)
    # A run made by a sweep: which sweep and which of its points (store.sweeps).
    sweep_id: Mapped[int | None] = mapped_column(
        ForeignKey("sweeps.id", ondelete="SET NULL"), index=True)
    sweep_point: Mapped[int | None] = mapped_column(Integer)


# Core handle for queries that want plain rows (attribute access by column name), no ORM session.
RUNS = Run.__table__

SUMMARY_COLUMNS = (
    "elapsed_s", "output_tokens_per_s", "prefix_hit_rate", "peak_blocks_used",
    "num_preemptions", "num_evictions",
)


def _trace_table(name: str, cls: type, key: tuple[str, ...], *extra: Column,
                 indexes: tuple[Index, ...] = ()) -> Table:
    """A child table of `runs` whose columns come from a trace dataclass (store.trace_columns).
    `key` lists the dataclass fields and `extra` columns that follow run_id in the primary key,
    in key order, so the key is the range-scan index Replay needs."""
    columns = {c.name: c for c in (*sql_columns(cls, primary=key), *extra)}
    ordered = [columns.pop(k) for k in key] + list(columns.values())
    run_id = Column("run_id", ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    return Table(name, Base.metadata, run_id, *ordered, *indexes, **_CLUSTERED)


class Step(Base):
    """One StepRecord (same field names)."""

    __table__ = _trace_table("steps", StepRecord, ("step",))


class BlockEventRow(Base):
    """One BlockEvent; `ordinal` is its emission position within the step; `kind` a code."""

    __table__ = _trace_table("block_events", BlockEvent, ("step", "ordinal"),
                             Column("ordinal", Integer, primary_key=True))


class RequestEventRow(Base):
    """One RequestEvent; `ordinal` is its emission position within the step; `kind` a code."""

    __table__ = _trace_table("request_events", RequestEvent, ("step", "ordinal"),
                             Column("ordinal", Integer, primary_key=True))


class RequestRow(Base):
    """One RequestRecord; `ordinal` keeps the order the engine reported them in."""

    __table__ = _trace_table("requests", RequestRecord, ("ordinal",),
                             Column("ordinal", Integer, primary_key=True),
                             indexes=(Index("ix_requests_run_request", "run_id", "request_id"),))


class TelemetryRow(Base):
    """One TelemetrySample (same field names); `ordinal` keeps the sampling order."""

    __table__ = _trace_table("telemetry", TelemetrySample, ("ordinal",),
                             Column("ordinal", Integer, primary_key=True))


class KeyframeRow(Base):
    """A full block state after `step`, as zlib-compressed JSON (see store.keyframes)."""

    __tablename__ = "keyframes"
    __table_args__ = _CLUSTERED

    run_id: Mapped[int] = _run_fk()
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    num_blocks: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


CHILD_TABLES = (Step, BlockEventRow, RequestEventRow, RequestRow, KeyframeRow, TelemetryRow)


class QualityRow(Base):
    """One quality evaluation (`cli.py quality`, the Quality page): the figures of
    engine.quality_result.QualityResult (same names) and the RunConfig evaluated."""

    __table__ = Table(
        "quality_results", Base.metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("created_at", DateTime, index=True),
        Column("config_json", Text),
        *sql_columns(QualityResult),
    )


class Sweep(Base):
    """A what-if sweep: a base RunConfig and axes (`spec`), expanded into `points`.

    Its runs point to it (`Run.sweep_id`, `Run.sweep_point`); a point's outcome is its newest
    run. `point_errors` holds the driver's record of points that failed (a config invalid
    only in combination, a task that raised, a worker that died), keyed by the point index
    as a string; it overrides an unfinished newest run. Only the sweep's driver writes this
    row; `driver_*` identify it the way `Run.writer_*` identify a run's writer
    (store.liveness). Status moves running ->
    finished | interrupted | failed; a finished sweep may still hold failed points.
    Schema version 4 (store.db._migrate_add_sweeps).
    """

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # base config, axes, repeat, sample
    points: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # {"values", "repeat"} by index
    num_points: Mapped[int] = mapped_column(Integer)
    point_errors: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)  # the driver's, for remote
    error: Mapped[str | None] = mapped_column(Text)
    driver_pid: Mapped[int | None] = mapped_column(Integer)
    driver_host: Mapped[str | None] = mapped_column(String(255))
    driver_started: Mapped[float | None] = mapped_column(Float)
