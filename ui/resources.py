"""Cached resources and queries for the pages.

`st.cache_resource` holds the database engine (one `Store` per URL) and loaded models (one per
name, device, dtype and seed); `st.cache_data` holds query results. Every query is written once
as a function of `(store_url, *args)` under `@store_query`, which caches it by the URL (tests
point `$KVLAB_DB_URL` at a fresh file each) and lets the pages call it with `*args` alone.
Per-run queries also take the run's `rev` (status and step count), so a run that is still
being written is re-read as it grows.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar

import pandas as pd
import pyarrow as pa
import streamlit as st

from engine.config import RunConfig
from engine.trace import BlockState
from store import RunInfo, RunReader, Store, open_store
from ui import analysis, charts, timeline

if TYPE_CHECKING:
    from engine.models.loader import LoadedModel

QUERY_CACHE = 256  # entries per cached query; block states are small, steps frames are not
P = ParamSpec("P")
R = TypeVar("R")


def db_url() -> str:
    """The URL the store will open ('' means the store's default)."""
    return os.environ.get("KVLAB_DB_URL", "")


@st.cache_resource(show_spinner=False)
def _store(url: str) -> Store:
    return open_store(url or None)


def get_store() -> Store:
    return _store(db_url())


@st.cache_resource(show_spinner=False, max_entries=4)
def _model(key: tuple[str, str, str, int]) -> LoadedModel:
    from engine.run import load_model_by_key  # torch model code: only when a run starts

    return load_model_by_key(key)


def get_model(config: RunConfig) -> LoadedModel:
    """The config's model, loaded once per `engine.run.model_key` for the whole server.

    Safe to call from a run's background thread: the cache has its own lock.
    """
    from engine.run import model_key

    return _model(model_key(config))


# Queries ------------------------------------------------------------------------------------
class StoreQuery(Generic[P, R]):
    """A cached query of the current store: `query(*args)` is `query.at(db_url(), *args)`.

    `at` is the `st.cache_data` function itself, keyed by the URL; queries built on other
    queries call `other.at(url, ...)` so they read the store their own cache entry is for.
    """

    def __init__(self, fn: Callable[Concatenate[str, P], R], cached: Any) -> None:
        functools.update_wrapper(self, fn)
        self.at: Callable[Concatenate[str, P], R] = cached

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.at(db_url(), *args, **kwargs)

    def clear(self) -> None:
        self.at.clear()


def store_query(**cache_options: Any) -> Callable[[Callable[Concatenate[str, P], R]],
                                                   StoreQuery[P, R]]:
    """`@store_query(max_entries=...)` over `def q(store_url, *args)`: cache it with
    `st.cache_data(**cache_options)` and call it as `q(*args)`."""

    def wrap(fn: Callable[Concatenate[str, P], R]) -> StoreQuery[P, R]:
        return StoreQuery(fn, st.cache_data(show_spinner=False, **cache_options)(fn))

    return wrap


@store_query(ttl=5, max_entries=16)
def list_runs(url: str, limit: int | None = None) -> pd.DataFrame:
    store = _store(url)
    # open_store marks dead writers' runs only once, and the store lives as long as the server:
    # a CLI run killed while the dashboard is up would otherwise stay `running` for good.
    store.mark_stale_runs()
    return RunReader(store).list_runs(limit=limit)


@store_query(ttl=30)
def quality_results(url: str) -> pd.DataFrame:
    """Every stored quality evaluation (store.quality), oldest first."""
    from store.quality import list_quality

    return list_quality(_store(url))


def refresh_quality() -> None:
    quality_results.clear()


def refresh_runs() -> None:
    """Forget cached run lists (a run finished, or one was imported or deleted)."""
    list_runs.clear()


def run_rev(runs: pd.DataFrame, run_id: int) -> str:
    """A cache key part that changes while a run is still being written."""
    row = runs.loc[runs["run_id"] == run_id]
    if row.empty:
        return "?"
    return f"{row['status'].iloc[0]}/{row['num_steps'].iloc[0]}"


def run_label(row: pd.Series) -> str:
    name = row.get("name") or f"run {row['run_id']}"
    imported = ", imported" if row.get("imported") is True else ""
    return f"#{row['run_id']} {name} ({row['status']}, {row['num_steps']} steps{imported})"


@store_query(max_entries=QUERY_CACHE)
def run_info(url: str, run_id: int, rev: str) -> RunInfo:
    return RunReader(_store(url)).run_info(run_id)


@store_query(max_entries=16)
def steps(url: str, run_id: int, rev: str) -> pd.DataFrame:
    return RunReader(_store(url)).steps(run_id)


@store_query(max_entries=16)
def telemetry(url: str, run_id: int, rev: str) -> pd.DataFrame:
    return RunReader(_store(url)).telemetry(run_id)


@store_query(max_entries=16)
def request_events(url: str, run_id: int, rev: str) -> pd.DataFrame:
    """The run's request events, each with its request's label (the workload file's id)."""
    reader = RunReader(_store(url))
    return analysis.with_request_labels(reader.request_events(run_id), reader.requests(run_id))


@store_query(max_entries=16)
def requests(url: str, run_id: int, rev: str) -> pd.DataFrame:
    return RunReader(_store(url)).requests(run_id)


@store_query(max_entries=QUERY_CACHE)
def block_state_at(url: str, run_id: int, step: int, rev: str) -> BlockState:
    return RunReader(_store(url)).block_state_at(run_id, step)


@store_query(max_entries=QUERY_CACHE)
def block_events_at(url: str, run_id: int, step: int, rev: str) -> pd.DataFrame:
    return RunReader(_store(url)).block_events(run_id, step_from=step, step_to=step)


# Derived frames: computed once per run revision, then every slider move reuses them ---------
@store_query(max_entries=16)
def step_series(url: str, run_id: int, rev: str) -> pd.DataFrame:
    """Derived per-step metrics (ui.analysis.step_metrics), thinned for drawing."""
    return analysis.downsample(analysis.step_metrics(steps.at(url, run_id, rev)))


@store_query(max_entries=16)
def request_segments(url: str, run_id: int, rev: str, last_step: int) -> pd.DataFrame:
    return timeline.request_segments(request_events.at(url, run_id, rev), last_step)


# Chart specs of a whole run: built (and validated) once per run revision; Replay layers the
# current step's rule onto copies with ui.charts.with_step_rule.
@store_query(max_entries=64)
def run_chart_spec(url: str, run_id: int, rev: str, name: str, last_step: int) -> dict:
    """'blocks', 'requests' or a ui.analysis.SERIES_LABELS column, as a Vega-Lite dict whose
    named datasets are Arrow IPC bytes."""
    if name == "blocks":
        chart = charts.block_mix_chart(analysis.block_mix(step_series.at(url, run_id, rev)))
    elif name == "requests":
        chart = timeline.request_timeline_chart(
            request_segments.at(url, run_id, rev, last_step), title="request timeline")
    else:
        chart = charts.series_chart(step_series.at(url, run_id, rev), name)
    spec = chart.to_dict()
    # Streamlit turns a dataset of rows into Arrow at every st.vega_lite_chart call and passes
    # bytes through untouched: converted here once per run, not at every slider move (it was
    # half of a move's server time with Replay's five whole-run charts).
    spec["datasets"] = {k: arrow_ipc(rows) for k, rows in spec.get("datasets", {}).items()}
    return spec


def arrow_ipc(rows: list[dict[str, Any]]) -> bytes:
    """Rows as an Arrow IPC stream, the form Streamlit sends a chart's named dataset in."""
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# Sweeps ------------------------------------------------------------------------------------
@store_query(ttl=2, max_entries=16)
def list_sweeps(url: str) -> pd.DataFrame:
    """Sweeps newest first with their point counts (store.sweeps.list_sweeps); a short TTL
    because a running sweep's counts move."""
    from store.sweeps import list_sweeps as query

    return query(_store(url))


@store_query(ttl=2, max_entries=16)
def sweep_points(url: str, sweep_id: int, rev: str) -> pd.DataFrame:
    """A sweep's points with their newest runs' summaries (store.sweeps.sweep_points)."""
    from store.sweeps import sweep_points as query

    return query(_store(url), sweep_id)


def refresh_sweeps() -> None:
    list_sweeps.clear()
    sweep_points.clear()
