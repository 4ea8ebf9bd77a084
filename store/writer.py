"""RunWriter: the engine's TraceSink that writes one run into the store.

The engine's steps can take a few milliseconds, so the sink calls only append to in-memory
lists; a background thread commits them in batches (every `max_batch_steps` steps or
`flush_interval_s` seconds, whichever comes first), one transaction per batch. Each batch is a
prefix of everything recorded so far (all tables taken under one lock), so a killed process
leaves a database whose committed steps, events and keyframes are mutually consistent, and
the run row's `num_steps` is updated in the same transaction.

The run row appears in the database in the same transaction as the run's first keyframe (or,
for a run that ends before recording anything, with its final status), never before: a reader
that lists a run can always rebuild its block state. So `run_id` is None until the engine's
first sink call; `on_open` is told the id as soon as it exists.

A write error stops the thread; the next sink call raises it, and `close()` marks the run failed
and raises it, so a trace is never silently incomplete.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, update

from engine.config import RunConfig
from engine.run_result import RunSummary
from engine.trace import (
    BlockEvent,
    Keyframe,
    RequestEvent,
    RequestRecord,
    StepRecord,
    TelemetrySample,
)
from store.db import Store, utcnow
from store.errors import StoreError
from store.keyframes import encode_keyframe
from store.liveness import HEARTBEAT_INTERVAL_S, process_start_time, this_host
from store.models import (
    SUMMARY_COLUMNS,
    BlockEventRow,
    KeyframeRow,
    RequestEventRow,
    RequestRow,
    Run,
    Step,
    TelemetryRow,
)
from store.trace_columns import to_sql_row, trace_columns

STEP_COLUMNS = trace_columns(StepRecord)
BLOCK_EVENT_COLUMNS = trace_columns(BlockEvent)
REQUEST_EVENT_COLUMNS = trace_columns(RequestEvent)
REQUEST_COLUMNS = trace_columns(RequestRecord)
TELEMETRY_COLUMNS = trace_columns(TelemetrySample)


class _Ordinals:
    """Emission position within a step; events of one step may arrive over several calls."""

    __slots__ = ("step", "count")

    def __init__(self) -> None:
        self.step: int | None = None
        self.count = 0

    def next(self, step: int) -> int:
        if step != self.step:
            self.step, self.count = step, 0
        self.count += 1
        return self.count - 1


@dataclass
class _Batch:
    steps: list[tuple[StepRecord, list[BlockEvent], list[RequestEvent]]] = field(
        default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    keyframes: list[Keyframe] = field(default_factory=list)
    telemetry: list[TelemetrySample] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.steps or self.requests or self.keyframes or self.telemetry)


class RunWriter:
    """Writes one run; see `close()` for how it ends.

    Only the engine's thread calls the sink methods (the first of them inserts the run row, on
    that thread); the background thread owns the database connection for batches after that.
    `_pending`, `_busy`, `_stopping`, `_error` are guarded by `_cond`.
    """

    def __init__(
        self,
        store: Store,
        config: RunConfig,
        name: str | None = None,
        tags: Sequence[str] = (),
        *,
        on_open: Callable[[int], None] | None = None,
        sweep_id: int | None = None,
        sweep_point: int | None = None,
        flush_interval_s: float = 0.25,
        max_batch_steps: int = 256,
        max_pending_steps: int = 8192,
    ) -> None:
        self._store = store
        self._on_open = on_open
        self._interval = flush_interval_s
        self._max_batch = max_batch_steps
        self._max_pending = max_pending_steps  # back-pressure: bounded memory if the DB stalls
        self._cond = threading.Condition()
        self._pending = _Batch()
        self._busy = False
        self._stopping = False
        self._flush_wanted = False
        self._error: BaseException | None = None
        self._closed = False
        self._num_steps = 0
        self._num_requests = 0
        self._num_samples = 0
        self._block_ordinals = _Ordinals()  # used by the background thread only
        self._request_ordinals = _Ordinals()
        self.run_id: int | None = None  # set when the run row is inserted (see module docstring)
        self._run_values: dict[str, Any] = dict(
            name=name, tags=list(tags), config_json=config.to_json(), status="running",
            model=config.model, num_steps=0, writer_pid=os.getpid(), writer_host=this_host(),
            writer_started=process_start_time(), sweep_id=sweep_id, sweep_point=sweep_point)
        self._thread = threading.Thread(target=self._loop, name="kvlab-writer", daemon=True)

    def _open(self, first_keyframe: Keyframe | None = None, **final: Any) -> int:
        """Insert the run row, with `first_keyframe` in the same transaction, and start the
        background thread (unless `final` values already end the run)."""
        now = utcnow()
        values = {**self._run_values, "created_at": now, "heartbeat_at": now, **final}
        try:
            with self._store.write() as conn:
                run_id = conn.execute(insert(Run).values(**values).returning(Run.id)).scalar_one()
                if first_keyframe is not None:
                    conn.execute(insert(KeyframeRow), [_keyframe_row(run_id, first_keyframe)])
        except Exception as exc:
            raise StoreError(f"could not start a run in {self._store.display_url}: {exc}") from exc
        self.run_id = run_id
        if not final:
            self._thread.name = f"kvlab-writer-{run_id}"
            self._thread.start()
        if self._on_open is not None:
            self._on_open(run_id)
        return run_id

    # TraceSink ------------------------------------------------------------------------------
    def record_step(self, step: StepRecord, block_events: Sequence[BlockEvent],
                    request_events: Sequence[RequestEvent]) -> None:
        if self.run_id is None:
            self._open()
        with self._cond:
            self._check_open()
            if len(self._pending.steps) >= self._max_pending:
                self._cond.wait_for(lambda: len(self._pending.steps) < self._max_pending
                                    or self._error is not None)
                self._check_open()
            self._pending.steps.append((step, list(block_events), list(request_events)))
            if len(self._pending.steps) >= self._max_batch:
                self._cond.notify_all()

    def record_request(self, request: RequestRecord) -> None:
        if self.run_id is None:
            self._open()
        with self._cond:
            self._check_open()
            self._pending.requests.append(request)

    def record_telemetry(self, sample: TelemetrySample) -> None:
        if self.run_id is None:
            return  # samples before the run exists (model load) are not the run's
        with self._cond:
            self._check_open()
            self._pending.telemetry.append(sample)

    def record_keyframe(self, keyframe: Keyframe) -> None:
        if self.run_id is None:
            self._check_open()
            self._open(first_keyframe=keyframe)
            return
        with self._cond:
            self._check_open()
            self._pending.keyframes.append(keyframe)

    # Control --------------------------------------------------------------------------------
    def set_device(self, device: str, model: str) -> None:
        if self.run_id is None:
            self._run_values.update(device=device, model=model)
            return
        with self._store.write() as conn:
            conn.execute(update(Run).where(Run.id == self.run_id)
                         .values(device=device, model=model))

    def flush(self) -> None:
        """Block until everything recorded so far is committed (tests, progress displays)."""
        if self.run_id is None:
            return
        with self._cond:
            self._check_open()
            self._flush_wanted = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: (not self._pending and not self._busy)
                                or self._error is not None)
            self._check_open()

    def close(self, summary: RunSummary | Mapping[str, Any] | None = None,
              error: str | None = None, interrupted: bool = False) -> None:
        """Flush and end the run: `failed` with `error`, else `interrupted`, else `finished`."""
        if self._closed:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        write_error = self._error
        if write_error is not None:
            error = f"{error}; " if error else ""
            error += f"trace writer failed: {write_error}"
        status = "failed" if error else "interrupted" if interrupted else "finished"
        values: dict[str, Any] = dict(status=status, error=error, finished_at=utcnow())
        if summary is not None:
            data = summary.to_dict() if isinstance(summary, RunSummary) else dict(summary)
            values["summary"] = data
            values.update({k: data[k] for k in SUMMARY_COLUMNS if k in data})
        if self.run_id is None:  # nothing was recorded: the row is born with its final status
            self._open(**values)
            self._closed = True
            return
        try:
            with self._store.write() as conn:
                conn.execute(update(Run).where(Run.id == self.run_id).values(**values))
        except Exception as exc:
            raise StoreError(f"could not finish run {self.run_id} in "
                             f"{self._store.display_url}: {exc}") from exc
        # Closed only once the status row is written, so a retry (close(error=...)) can still
        # mark the run failed instead of leaving it `running` under a live pid.
        self._closed = True
        if write_error is not None:
            raise StoreError(f"run {self.run_id}: the trace could not be written "
                             f"({write_error}); the run is marked failed") from write_error

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(error=f"{exc_type.__name__}: {exc}" if exc_type else None)

    # Background thread ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._error is not None:
            raise StoreError(f"run {self.run_id}: the trace writer failed: {self._error}")
        if self._closed or self._stopping:
            raise StoreError(f"run {self.run_id}: the writer is closed")

    def _loop(self) -> None:
        last_write = time.monotonic()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._flush_wanted
                                    or len(self._pending.steps) >= self._max_batch,
                                    timeout=self._interval)
                batch, self._pending = self._pending, _Batch()
                self._busy, self._flush_wanted = True, False
                stopping = self._stopping
                self._cond.notify_all()  # wakes a record_step waiting on back-pressure
            heartbeat_due = time.monotonic() - last_write > HEARTBEAT_INTERVAL_S
            try:
                if batch or heartbeat_due:
                    self._write(batch)
                    last_write = time.monotonic()
            except BaseException as exc:  # surfaced by the sink calls and close()
                with self._cond:
                    self._error, self._busy = exc, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            if stopping:
                return

    def _write(self, batch: _Batch) -> None:
        step_rows, block_rows, request_event_rows = [], [], []
        for record, block_events, request_events in batch.steps:
            step_rows.append({"run_id": self.run_id, **to_sql_row(record, STEP_COLUMNS)})
            block_rows.extend(
                {"run_id": self.run_id, "ordinal": self._block_ordinals.next(e.step),
                 **to_sql_row(e, BLOCK_EVENT_COLUMNS)} for e in block_events)
            request_event_rows.extend(
                {"run_id": self.run_id, "ordinal": self._request_ordinals.next(e.step),
                 **to_sql_row(e, REQUEST_EVENT_COLUMNS)} for e in request_events)
        request_rows = []
        for request in batch.requests:
            request_rows.append({"run_id": self.run_id, "ordinal": self._num_requests,
                                 **to_sql_row(request, REQUEST_COLUMNS)})
            self._num_requests += 1
        keyframe_rows = [_keyframe_row(self.run_id, k) for k in batch.keyframes]
        telemetry_rows = []
        for sample in batch.telemetry:
            telemetry_rows.append({"run_id": self.run_id, "ordinal": self._num_samples,
                                   **to_sql_row(sample, TELEMETRY_COLUMNS)})
            self._num_samples += 1
        with self._store.write() as conn:
            for model, rows in ((Step, step_rows), (BlockEventRow, block_rows),
                                (RequestEventRow, request_event_rows), (RequestRow, request_rows),
                                (KeyframeRow, keyframe_rows), (TelemetryRow, telemetry_rows)):
                if rows:
                    conn.execute(insert(model), rows)
            conn.execute(update(Run).where(Run.id == self.run_id).values(
                num_steps=self._num_steps + len(step_rows), heartbeat_at=utcnow()))
        self._num_steps += len(step_rows)


def _keyframe_row(run_id: int, keyframe: Keyframe) -> dict[str, Any]:
    return {"run_id": run_id, "step": keyframe.step, "num_blocks": len(keyframe.ref_counts),
            "data": encode_keyframe(keyframe)}
