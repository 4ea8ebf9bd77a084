"""Sweeps in the store: the sweep row, its points' outcomes, and the sweep as one file.

A sweep row holds its spec and its expanded points (so this module needs nothing from the
`sweep` package); runs point to it with `runs.sweep_id`/`sweep_point`. A point's outcome is its
newest run (a retried or resumed point has several), or "pending" without one; an entry in
`point_errors` (the driver's record of a failed task, with or without a run row) makes an
unfinished point "failed".
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Connection, insert, select, update

from store.db import Store, utcnow
from store.errors import StoreError
from store.liveness import process_start_time, this_host, writer_alive
from store.models import RUNS, Run, Sweep
from store.portable import export_run

SWEEP_FILE_FORMAT = "kvlab-sweep"
SWEEP_FILE_VERSION = 1
POINT_STATUSES = ("pending", "running", "finished", "failed", "interrupted")


@dataclass
class SweepInfo:
    sweep_id: int
    name: str | None
    status: str
    spec: dict[str, Any]
    points: list[dict[str, Any]]
    point_errors: dict[str, str]
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    driver_alive: bool  # the process driving a `running` sweep still exists (store.liveness)
    # `status` reads "interrupted" for a sweep left `running` by a driver that is gone.

    @property
    def axis_names(self) -> list[str]:
        return [axis["name"] for axis in self.spec.get("axes", [])]


def _driver_values() -> dict[str, Any]:
    return dict(driver_pid=os.getpid(), driver_host=this_host(),
                driver_started=process_start_time(), heartbeat_at=utcnow())


def create_sweep(store: Store, *, name: str | None, spec: dict[str, Any],
                 points: list[dict[str, Any]], point_errors: dict[int, str]) -> int:
    """Insert a `running` sweep driven by this process; returns its id."""
    values = dict(name=name, status="running", spec=spec, points=points,
                  num_points=len(points), created_at=utcnow(),
                  point_errors={str(k): v for k, v in point_errors.items()}, **_driver_values())
    with store.write() as conn:
        return conn.execute(insert(Sweep).values(**values).returning(Sweep.id)).scalar_one()


def _sweep_row(conn: Connection, sweep_id: int, store: Store, lock: bool = False) -> Any:
    query = select(Sweep.__table__).where(Sweep.id == sweep_id)
    row = conn.execute(query.with_for_update() if lock else query).one_or_none()
    if row is None:
        raise StoreError(f"no sweep {sweep_id} in {store.display_url}; list the sweeps with "
                         "`python cli.py sweeps`")
    return row


def _info(row: Any) -> SweepInfo:
    alive = row.status == "running" and writer_alive(
        row.driver_pid, row.driver_host, row.driver_started, row.heartbeat_at, utcnow())
    # A `running` sweep whose driver is gone reads as interrupted (a resume picks it up).
    status = "interrupted" if row.status == "running" and not alive else row.status
    return SweepInfo(row.id, row.name, status, dict(row.spec), list(row.points),
                     dict(row.point_errors or {}), row.created_at, row.finished_at, row.error,
                     alive)


def sweep_info(store: Store, sweep_id: int) -> SweepInfo:
    with store.engine.connect() as conn:
        return _info(_sweep_row(conn, sweep_id, store))


def claim_sweep(store: Store, sweep_id: int) -> SweepInfo:
    """Make this process the driver of a sweep (a new one, or a resume), unless another live
    process still drives it."""
    with store.write() as conn:
        row = _sweep_row(conn, sweep_id, store, lock=True)
        info = _info(row)
        ours = row.driver_pid == os.getpid() and row.driver_host == this_host()
        if info.driver_alive and not ours:
            raise StoreError(f"sweep {sweep_id} is still being run by another process; stop it "
                             "first (Ctrl-C or Stop), then resume")
        conn.execute(update(Sweep).where(Sweep.id == sweep_id).values(
            status="running", finished_at=None, error=None, **_driver_values()))
    info.status = "running"
    return info


def heartbeat(store: Store, sweep_id: int) -> None:
    """The driver is alive (seen from other hosts, which cannot check its pid)."""
    with store.write() as conn:
        conn.execute(update(Sweep).where(Sweep.id == sweep_id).values(heartbeat_at=utcnow()))


def end_sweep(store: Store, sweep_id: int, status: str, error: str | None = None) -> None:
    with store.write() as conn:
        conn.execute(update(Sweep).where(Sweep.id == sweep_id)
                     .values(status=status, error=error, finished_at=utcnow()))


def set_point_errors(store: Store, sweep_id: int, errors: dict[int, str | None]) -> None:
    """Record (a message) or clear (None) the run-less failure of some points."""
    with store.write() as conn:
        row = _sweep_row(conn, sweep_id, store, lock=True)
        merged = dict(row.point_errors or {})
        for point, message in errors.items():
            if message is None:
                merged.pop(str(point), None)
            else:
                merged[str(point)] = message
        conn.execute(update(Sweep).where(Sweep.id == sweep_id).values(point_errors=merged))


def close_orphan_runs(store: Store, sweep_id: int, status: str, error: str,
                      points: list[int] | None = None) -> list[int]:
    """Give `running` runs of the sweep (of `points`, or all) a final status; returns their ids.

    The driver calls this once the tasks that wrote them are over (a killed worker never
    closes its run), so no live writer is touched.
    """
    query = select(Run.id).where(Run.sweep_id == sweep_id, Run.status == "running")
    if points is not None:
        query = query.where(Run.sweep_point.in_(points))
    with store.write() as conn:
        ids = list(conn.execute(query).scalars())
        if ids:
            conn.execute(update(Run).where(Run.id.in_(ids))
                         .values(status=status, error=error, finished_at=utcnow()))
    return ids


def _runs_by_point(conn: Connection, sweep_ids: list[int]) -> dict[tuple[int, int], list[Any]]:
    """Each (sweep, point)'s runs, oldest first."""
    rows = conn.execute(
        select(RUNS.c.id, RUNS.c.sweep_id, RUNS.c.sweep_point, RUNS.c.status, RUNS.c.error,
               RUNS.c.summary, RUNS.c.num_steps)
        .where(RUNS.c.sweep_id.in_(sweep_ids)).order_by(RUNS.c.id)).all()
    grouped: dict[tuple[int, int], list[Any]] = {}
    for row in rows:
        grouped.setdefault((row.sweep_id, row.sweep_point), []).append(row)
    return grouped


def _last_line(text: str | None) -> str | None:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def _point_records(info: SweepInfo, runs: dict[tuple[int, int], list[Any]]) -> list[dict]:
    records = []
    for index, point in enumerate(info.points):
        attempts = runs.get((info.sweep_id, index), [])
        failed = info.point_errors.get(str(index))
        record: dict[str, Any] = {"point": index, "repeat": point.get("repeat", 0)}
        if attempts:
            run = attempts[-1]
            record.update(status=run.status, run_id=run.id, error=_last_line(run.error),
                          num_steps=run.num_steps)
            summary = run.summary or {}
        else:
            record.update(status="pending", run_id=None, error=None, num_steps=0)
            summary = {}
        if failed and record["status"] != "finished":
            # The driver's verdict: a run whose worker was killed may read `interrupted`
            # (store.db marks a dead writer's run so) but the point failed.
            record.update(status="failed", error=failed)
        record["attempts"] = len(attempts)
        record.update(point.get("values", {}))
        for key, value in summary.items():
            record.setdefault(key, value)  # an axis wins a name clash (num_blocks)
        records.append(record)
    return records


def sweep_points(store: Store, sweep_id: int) -> pd.DataFrame:
    """One row per point: point, repeat, status, run_id, error, attempts, num_steps, the axis
    values (one column per axis) and the RunSummary fields of its newest run."""
    with store.engine.connect() as conn:
        info = _info(_sweep_row(conn, sweep_id, store))
        runs = _runs_by_point(conn, [sweep_id])
    df = pd.DataFrame.from_records(_point_records(info, runs))
    if df.empty:
        df = pd.DataFrame(columns=["point", "repeat", "status", "run_id", "error", "attempts"])
    df["run_id"] = df["run_id"].astype("Int64")
    return df


def point_counts(df: pd.DataFrame) -> dict[str, int]:
    """How many points are in each status (sweep_points' frame)."""
    counts = df["status"].value_counts() if len(df) else {}
    return {status: int(counts.get(status, 0)) for status in POINT_STATUSES}


def list_sweeps(store: Store, limit: int | None = None) -> pd.DataFrame:
    """Sweeps newest first, with their point counts by status."""
    query = select(Sweep.__table__).order_by(Sweep.created_at.desc(), Sweep.id.desc())
    with store.engine.connect() as conn:
        rows = conn.execute(query.limit(limit) if limit else query).all()
        runs = _runs_by_point(conn, [r.id for r in rows]) if rows else {}
    records = []
    for row in rows:
        info = _info(row)
        counts = point_counts(pd.DataFrame.from_records(_point_records(info, runs)))
        records.append({"sweep_id": info.sweep_id, "name": info.name, "status": info.status,
                        "axes": ", ".join(info.axis_names), "points": len(info.points),
                        **counts, "created_at": info.created_at,
                        "finished_at": info.finished_at})
    columns = ["sweep_id", "name", "status", "axes", "points", *POINT_STATUSES, "created_at",
               "finished_at"]
    return pd.DataFrame.from_records(records, columns=columns)


def export_sweep(store: Store, sweep_id: int, path: str | Path) -> Path:
    """One zip: `manifest.json` (the sweep row and which run file is which point),
    `points.csv` (sweep_points) and `runs/run-<id>.kvtrace.zip` for every run of the sweep
    (store.export_run's files, importable one by one with `cli.py import`)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise StoreError(f"cannot export to {path}: folder {path.parent} does not exist")
    info = sweep_info(store, sweep_id)
    points = sweep_points(store, sweep_id)
    with store.engine.connect() as conn:
        runs = conn.execute(select(Run.id, Run.sweep_point, Run.status)
                            .where(Run.sweep_id == sweep_id).order_by(Run.id)).all()
    manifest = {
        "format": SWEEP_FILE_FORMAT, "format_version": SWEEP_FILE_VERSION,
        "exported_at": utcnow().isoformat(),
        "sweep": {"sweep_id": info.sweep_id, "name": info.name, "status": info.status,
                  "spec": info.spec, "points": info.points, "point_errors": info.point_errors,
                  "created_at": info.created_at.isoformat(), "error": info.error,
                  "finished_at": info.finished_at.isoformat() if info.finished_at else None},
        "runs": [{"run_id": r.id, "point": r.sweep_point, "status": r.status,
                  "file": f"runs/run-{r.id}.kvtrace.zip"} for r in runs],
    }
    partial = path.with_name(path.name + ".part")  # a failure leaves no half-written file
    try:
        with tempfile.TemporaryDirectory() as tmp, \
                zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("manifest.json", json.dumps(manifest, indent=1, default=str))
            archive.writestr("points.csv", points.to_csv(index=False))
            for run in manifest["runs"]:  # already zstd inside: stored, not deflated again
                archive.write(export_run(store, run["run_id"], Path(tmp) / "run.zip"),
                              run["file"])
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path
