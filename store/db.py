"""Opening the trace database: URL resolution, engine set-up, schema version, stale runs.

URL order: the `url` argument (the CLI's `--db`), then `$KVLAB_DB_URL`, then
`sqlite:///<project root>/data/kvlab.db`. Any SQLAlchemy URL works; SQLite and PostgreSQL are
tested.

SQLite is set up for one writer per run plus readers polling (the dashboard): WAL so readers
never block writers, `busy_timeout` so writers queue instead of failing with "database is
locked", `synchronous=NORMAL` (safe with WAL: a killed process loses nothing committed). Write
transactions start with `BEGIN IMMEDIATE` (see `Store.write`): a deferred transaction that
reads and then writes can fail at once with SQLITE_BUSY when another writer got in between, and
the busy timeout cannot help there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from store.errors import StoreError
from store.liveness import writer_alive
from store.models import Base, Run, SchemaInfo

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = f"sqlite:///{PROJECT_ROOT / 'data' / 'kvlab.db'}"
ENV_VAR = "KVLAB_DB_URL"
BUSY_TIMEOUT_MS = 30_000

# The schema version this code writes. To change the schema: bump it and add a step to
# MIGRATIONS that takes a database from version N-1 to N (plain DDL on the connection).
SCHEMA_VERSION = 8


def _migrate_add_block_groups(conn: Connection) -> None:
    """2: KV cache groups. Block events name the group of their block (every older event was in
    the one group, 0); keyframes gain a fifth array, which store.keyframes derives for old ones."""
    conn.execute(text("ALTER TABLE block_events ADD COLUMN group_id BIGINT NOT NULL DEFAULT 0"))


def _migrate_add_quality_results(conn: Connection) -> None:
    """3: quality evaluations (KL, top-1, perplexity of a cache format against fp32)."""
    Base.metadata.tables["quality_results"].create(conn, checkfirst=True)


def _migrate_add_sweeps(conn: Connection) -> None:
    """4: the `sweeps` table (store.models.Sweep) and `runs.sweep_id`/`sweep_point`.

    Written out rather than created from the ORM so that it stays what version 4 was when the
    models change later; the column types are those SQLAlchemy emits for the models on each
    dialect, so a migrated database and a new one have the same schema.
    """
    postgres = conn.dialect.name == "postgresql"
    key = "SERIAL NOT NULL" if postgres else "INTEGER NOT NULL"
    timestamp = "TIMESTAMP WITHOUT TIME ZONE" if postgres else "DATETIME"
    conn.execute(text(
        f"CREATE TABLE sweeps (id {key}, name VARCHAR(200), status VARCHAR(16) NOT NULL, "
        "spec JSON NOT NULL, points JSON NOT NULL, num_points INTEGER NOT NULL, "
        f"point_errors JSON NOT NULL, created_at {timestamp} NOT NULL, finished_at {timestamp}, "
        f"heartbeat_at {timestamp}, error TEXT, driver_pid INTEGER, driver_host VARCHAR(255), "
        "driver_started FLOAT, PRIMARY KEY (id))"))
    # A nullable column with a NULL default: SQLite accepts a REFERENCES clause on ADD COLUMN
    # only then, and existing runs need no rewrite on either database.
    conn.execute(text("ALTER TABLE runs ADD COLUMN sweep_id INTEGER "
                      "REFERENCES sweeps (id) ON DELETE SET NULL"))
    conn.execute(text("ALTER TABLE runs ADD COLUMN sweep_point INTEGER"))
    conn.execute(text("CREATE INDEX ix_runs_sweep_id ON runs (sweep_id)"))


def _migrate_add_drop_reasons(conn: Connection) -> None:
    """5: retention policies' `drop` events say why a block went (out of window, ...)."""
    conn.execute(text("ALTER TABLE block_events ADD COLUMN reason TEXT"))


def _migrate_add_import_hash(conn: Connection) -> None:
    """6: imported runs. The SHA-256 of the trace file a run was imported from (NULL for runs
    recorded here, so every older run reads as recorded here); indexed because every import
    looks its hash up. The index name is the one `index=True` gives a fresh database."""
    conn.execute(text("ALTER TABLE runs ADD COLUMN import_sha256 VARCHAR(64)"))
    conn.execute(text("CREATE INDEX ix_runs_import_sha256 ON runs (import_sha256)"))


def _migrate_add_telemetry(conn: Connection) -> None:
    """7: the device sampler's readings (a `telemetry` table) and each decode step's roofline
    bound (`steps.roofline_s`)."""
    Base.metadata.tables["telemetry"].create(conn, checkfirst=True)
    conn.execute(text("ALTER TABLE steps ADD COLUMN roofline_s FLOAT"))


def _migrate_add_request_labels(conn: Connection) -> None:
    """8: request labels. A workload file's own request ids ("q0", a batch file's custom_id)
    are kept beside the engine's integer ids; requests recorded before have none (NULL)."""
    conn.execute(text("ALTER TABLE requests ADD COLUMN label TEXT"))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    2: _migrate_add_block_groups, 3: _migrate_add_quality_results, 4: _migrate_add_sweeps,
    5: _migrate_add_drop_reasons, 6: _migrate_add_import_hash, 7: _migrate_add_telemetry,
    8: _migrate_add_request_labels}


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every stored time is UTC by convention."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def resolve_url(url: str | None = None) -> str:
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    in_memory = parsed.database in (None, "", ":memory:")
    if not in_memory:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
        # One shared connection for an in-memory database, or each thread would see its own.
        poolclass=StaticPool if in_memory else None,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN instead of pysqlite's own logic.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def create_db_engine(url: str) -> Engine:
    try:
        if make_url(url).get_backend_name() == "sqlite":
            return _sqlite_engine(url)
        return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot use database URL {url!r}: {exc}; pass a SQLAlchemy URL such as "
                         "sqlite:///data/kvlab.db with --db or KVLAB_DB_URL") from exc


@dataclass
class Store:
    """An open trace database. Cheap to share between threads (the Engine pools connections)."""

    url: str
    engine: Engine

    @property
    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite): commits on exit, rolls back on error."""
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    def mark_stale_runs(self) -> list[int]:
        """Mark runs whose writer died `interrupted`; returns their ids.

        open_store does this once; long-lived callers (the dashboard) repeat it. It reads
        first, so the usual case (nothing stale) takes no write lock.
        """
        with self.engine.connect() as conn:
            if not _stale_run_ids(conn, utcnow()):
                return []
        with self.write() as conn:
            return mark_stale_runs(conn)

    def dispose(self) -> None:
        self.engine.dispose()


def open_store(url: str | None = None) -> Store:
    """Open (creating or migrating) the database and mark runs whose writer died `interrupted`."""
    resolved = resolve_url(url)
    store = Store(resolved, create_db_engine(resolved))
    try:
        with store.write() as conn:
            _ensure_schema(conn)
            mark_stale_runs(conn)
    except SQLAlchemyError as exc:
        store.dispose()
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise StoreError(f"cannot open database {store.display_url}: {reason}; check that the "
                         "server is running and the URL (--db or KVLAB_DB_URL) is right") from exc
    return store


def _ensure_schema(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        # Two processes opening a fresh database at once must not both create the tables;
        # SQLite gets the same serialisation from BEGIN IMMEDIATE.
        conn.execute(text("SELECT pg_advisory_xact_lock(7406131)"))
    tables = set(inspect(conn).get_table_names())
    if SchemaInfo.__tablename__ not in tables:
        if Run.__tablename__ in tables:
            raise StoreError("the database has kvlab tables but no schema version; it was not "
                             "made by this tool; point --db at another database")
        Base.metadata.create_all(conn)
        conn.execute(SchemaInfo.__table__.insert().values(id=1, version=SCHEMA_VERSION))
        return
    version = conn.execute(select(SchemaInfo.version).where(SchemaInfo.id == 1)).scalar_one()
    if version > SCHEMA_VERSION:
        raise StoreError(f"the database is at schema version {version} but this kvlab knows only "
                         f"up to {SCHEMA_VERSION}; upgrade kvlab or point --db at another database")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[target](conn)
        conn.execute(update(SchemaInfo).where(SchemaInfo.id == 1).values(version=target))
    # Tables added by a newer version with no migration step of their own (create_all skips
    # existing tables, so this is a no-op on an up-to-date database).
    Base.metadata.create_all(conn)


def schema_version(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(SchemaInfo.version).where(SchemaInfo.id == 1)).scalar_one()


def mark_stale_runs(conn: Connection) -> list[int]:
    """Mark `running` runs whose writer process is gone as `interrupted`; returns their ids."""
    now = utcnow()
    stale = _stale_run_ids(conn, now)
    if stale:
        conn.execute(
            update(Run).where(Run.id.in_(stale), Run.status == "running")
            .values(status="interrupted", finished_at=now,
                    error="the writing process stopped before closing the run")
        )
    return stale


def _stale_run_ids(conn: Connection, now: datetime) -> list[int]:
    rows = conn.execute(
        select(Run.id, Run.writer_pid, Run.writer_host, Run.writer_started, Run.heartbeat_at)
        .where(Run.status == "running")
    ).all()
    return [r.id for r in rows if not writer_alive(
        r.writer_pid, r.writer_host, r.writer_started, r.heartbeat_at, now)]
