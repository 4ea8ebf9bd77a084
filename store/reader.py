"""RunReader: runs, steps, events and requests as DataFrames, and block state at any step.

Per-run DataFrames have the trace dataclasses' field names as columns (no run_id: the caller
asked for one run), in recording order, with pandas nullable `Int64` for nullable integers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Row, func, select

from engine.config import ConfigError, RunConfig
from engine.trace import (
    BlockEvent,
    BlockState,
    Keyframe,
    RequestEvent,
    RequestRecord,
    StepRecord,
    TelemetrySample,
    apply_block_event,
)
from store.db import Store
from store.errors import StoreError
from store.keyframes import decode_keyframe
from store.models import (
    RUNS,
    BlockEventRow,
    KeyframeRow,
    RequestEventRow,
    RequestRow,
    Run,
    Step,
    TelemetryRow,
)
from store.trace_columns import TraceColumn, decode_codes, pandas_dtypes, trace_columns

STEP_COLUMNS = trace_columns(StepRecord)
BLOCK_EVENT_COLUMNS = trace_columns(BlockEvent)
REQUEST_EVENT_COLUMNS = trace_columns(RequestEvent)
REQUEST_COLUMNS = trace_columns(RequestRecord)
STEP_DTYPES = pandas_dtypes(StepRecord)
BLOCK_EVENT_DTYPES = pandas_dtypes(BlockEvent)
REQUEST_EVENT_DTYPES = pandas_dtypes(RequestEvent)
REQUEST_DTYPES = pandas_dtypes(RequestRecord)
TELEMETRY_COLUMNS = trace_columns(TelemetrySample)
TELEMETRY_DTYPES = pandas_dtypes(TelemetrySample)
RUN_COLUMNS = ("run_id", "name", "status", "model", "device", "created_at", "finished_at",
               "num_steps", "tags", "error", "imported")


def frame(rows: list[Any], dtypes: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=list(dtypes)).astype(dtypes)


@dataclass
class RunInfo:
    run_id: int
    name: str | None
    status: str
    config: RunConfig
    summary: dict[str, Any]
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    device: str | None
    model: str | None
    tags: list[str]
    num_steps: int
    import_sha256: str | None = None  # the trace file's hash for an imported run

    @property
    def imported(self) -> bool:
        return self.import_sha256 is not None


class RunReader:
    """Read-only queries; safe to use while writers are appending. Each call is one snapshot;
    inside `with reader.snapshot() as snap:` every call of `snap` sees the same one."""

    def __init__(self, store: Store, *, _connection: Connection | None = None) -> None:
        self.store = store
        self._connection = _connection  # set only by snapshot()

    @contextmanager
    def snapshot(self) -> Iterator[RunReader]:
        """A reader bound to one read transaction: a run that is still being written reads as
        it was when the first query ran (REPEATABLE READ on PostgreSQL; on SQLite a WAL read
        transaction already sees one snapshot)."""
        with self.store.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield RunReader(self.store, _connection=conn)

    def _connect(self) -> AbstractContextManager[Connection]:
        if self._connection is not None:
            return nullcontext(self._connection)
        return self.store.engine.connect()

    def list_runs(self, status: str | None = None, name_like: str | None = None,
                  limit: int | None = None) -> pd.DataFrame:
        """Runs newest first; summary figures as extra columns. `name_like` is a substring."""
        query = select(RUNS).order_by(Run.created_at.desc(), Run.id.desc())
        if status:
            query = query.where(Run.status == status)
        if name_like:
            query = query.where(Run.name.ilike(f"%{name_like}%"))
        if limit is not None:
            query = query.limit(limit)
        with self._connect() as conn:
            runs = conn.execute(query).all()
        records = []
        for run in runs:
            record = {"run_id": run.id, "name": run.name, "status": run.status,
                      "model": run.model, "device": run.device, "created_at": run.created_at,
                      "finished_at": run.finished_at, "num_steps": run.num_steps,
                      "tags": list(run.tags or []), "error": run.error,
                      "imported": run.import_sha256 is not None}
            for key, value in (run.summary or {}).items():
                record.setdefault(key, value)  # the run row wins on a name clash (device)
            records.append(record)
        df = pd.DataFrame.from_records(records)
        return df if len(df) else pd.DataFrame(columns=list(RUN_COLUMNS))

    def run_info(self, run_id: int) -> RunInfo:
        with self._connect() as conn:
            run = self._run(conn, run_id)
        try:
            config = RunConfig.from_json(run.config_json)
        except (ConfigError, ValueError, TypeError) as exc:
            raise StoreError(f"run {run_id}'s config cannot be read by this kvlab ({exc}); "
                             "upgrade kvlab to the version that recorded it") from exc
        return RunInfo(run.id, run.name, run.status, config, dict(run.summary or {}), run.error,
                       run.created_at, run.finished_at, run.device, run.model,
                       list(run.tags or []), run.num_steps, run.import_sha256)

    def steps(self, run_id: int) -> pd.DataFrame:
        query = _select(Step, STEP_COLUMNS).where(Step.run_id == run_id).order_by(Step.step)
        return self._frame(run_id, query, STEP_COLUMNS, STEP_DTYPES)

    def block_events(self, run_id: int, step_from: int | None = None,
                     step_to: int | None = None) -> pd.DataFrame:
        """Events with step_from <= step <= step_to (either bound optional), in emission order."""
        e = BlockEventRow
        query = (_select(e, BLOCK_EVENT_COLUMNS).where(e.run_id == run_id)
                 .order_by(e.step, e.ordinal))
        if step_from is not None:
            query = query.where(e.step >= step_from)
        if step_to is not None:
            query = query.where(e.step <= step_to)
        return self._frame(run_id, query, BLOCK_EVENT_COLUMNS, BLOCK_EVENT_DTYPES)

    def block_event_list(self, run_id: int, after: int, upto: int) -> list[BlockEvent]:
        """Events with after < step <= upto as BlockEvents, in emission order: for replaying
        many events in Python (no DataFrame on the way)."""
        e = BlockEventRow
        query = (_select(e, BLOCK_EVENT_COLUMNS)
                 .where(e.run_id == run_id, e.step > after, e.step <= upto)
                 .order_by(e.step, e.ordinal))
        return [BlockEvent(*values)
                for values in decode_codes(self._rows(run_id, query), BLOCK_EVENT_COLUMNS)]

    def request_events(self, run_id: int) -> pd.DataFrame:
        e = RequestEventRow
        query = (_select(e, REQUEST_EVENT_COLUMNS).where(e.run_id == run_id)
                 .order_by(e.step, e.ordinal))
        return self._frame(run_id, query, REQUEST_EVENT_COLUMNS, REQUEST_EVENT_DTYPES)

    def telemetry(self, run_id: int) -> pd.DataFrame:
        """The device sampler's readings, in time order (empty for runs without them)."""
        query = (_select(TelemetryRow, TELEMETRY_COLUMNS).where(TelemetryRow.run_id == run_id)
                 .order_by(TelemetryRow.ordinal))
        return self._frame(run_id, query, TELEMETRY_COLUMNS, TELEMETRY_DTYPES)

    def requests(self, run_id: int) -> pd.DataFrame:
        query = (_select(RequestRow, REQUEST_COLUMNS).where(RequestRow.run_id == run_id)
                 .order_by(RequestRow.ordinal))
        return self._frame(run_id, query, REQUEST_COLUMNS, REQUEST_DTYPES)

    def keyframes(self, run_id: int) -> list[Keyframe]:
        query = (select(KeyframeRow.step, KeyframeRow.data).where(KeyframeRow.run_id == run_id)
                 .order_by(KeyframeRow.step))
        return [decode_keyframe(step, data) for step, data in self._rows(run_id, query)]

    def keyframe_steps(self, run_id: int) -> list[int]:
        query = (select(KeyframeRow.step).where(KeyframeRow.run_id == run_id)
                 .order_by(KeyframeRow.step))
        return [r[0] for r in self._rows(run_id, query)]

    def last_step(self, run_id: int) -> int:
        """The last committed step (0 before the first step is committed)."""
        with self._connect() as conn:
            self._run(conn, run_id)
            last = conn.execute(select(func.max(Step.step)).where(Step.run_id == run_id))
            return last.scalar() or 0

    def block_state_at(self, run_id: int, step: int) -> BlockState:
        """State after `step`: the nearest keyframe at or before it plus the events since;
        an empty state (no blocks) for a run that has no keyframe at or before `step`."""
        e = BlockEventRow
        with self._connect() as conn:
            keyframe = conn.execute(
                select(KeyframeRow.step, KeyframeRow.data)
                .where(KeyframeRow.run_id == run_id, KeyframeRow.step <= step)
                .order_by(KeyframeRow.step.desc()).limit(1)
            ).first()
            if keyframe is None:
                # A run row without a keyframe holds no block state yet (a writer that ended
                # before its first keyframe, or an import of such a run): an empty pool.
                self._run(conn, run_id)
                return BlockState([], [], [], [])
            events = conn.execute(
                _select(e, BLOCK_EVENT_COLUMNS)
                .where(e.run_id == run_id, e.step > keyframe.step, e.step <= step)
                .order_by(e.step, e.ordinal)
            ).all()
        state = BlockState.from_keyframe(decode_keyframe(keyframe.step, keyframe.data))
        for values in decode_codes(events, BLOCK_EVENT_COLUMNS):
            apply_block_event(state, BlockEvent(*values))
        return state

    # Helpers ---------------------------------------------------------------------------------
    def _rows(self, run_id: int, query: Any) -> list[Any]:
        with self._connect() as conn:
            self._run(conn, run_id)
            return [tuple(r) for r in conn.execute(query)]

    def _frame(self, run_id: int, query: Any, columns: tuple[TraceColumn, ...],
               dtypes: dict[str, str]) -> pd.DataFrame:
        return frame(decode_codes(self._rows(run_id, query), columns), dtypes)

    def _run(self, conn: Connection, run_id: int) -> Row:
        run = conn.execute(select(RUNS).where(Run.id == run_id)).one_or_none()
        if run is None:
            raise StoreError(f"no run {run_id} in {self.store.display_url}; list the runs with "
                             "`python cli.py runs`")
        return run


def _select(model: type, columns: tuple[TraceColumn, ...]) -> Any:
    """SELECT of a trace table's dataclass columns, in field order."""
    return select(*(model.__table__.c[c.name] for c in columns))
