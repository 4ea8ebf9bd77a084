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
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar

import altair as alt
import numpy as np
import pandas as pd
import pyarrow as pa
import streamlit as st

from engine.config import RunConfig
from engine.trace import BlockState
from store import RunInfo, RunReader, Store, open_store
from ui import analysis, charts, timeline
from ui.holders import Event, HolderIndex, Holders

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


_warm_lock = threading.Lock()
_warm_started = False


def start_warm_up() -> None:
    """Once per server process, on a background thread: import the model code and build a model
    on the meta device (the first build imports ~820 torch modules: 3-30 s holding the GIL,
    which stalled every session when it happened at a first Run), and load the tokenizer (the
    token texts on Replay). `KVLAB_NO_WARM_UP=1` turns it off."""
    global _warm_started
    with _warm_lock:
        if _warm_started or os.environ.get("KVLAB_NO_WARM_UP") == "1":
            return
        _warm_started = True
    threading.Thread(target=_warm_up, name="kvlab-warm-up", daemon=True).start()


def _warm_up() -> None:
    try:
        import torch

        import engine.run  # noqa: F401 (the import is the point)
        from engine.models.config import MODEL_CONFIGS
        from engine.models.llama import Llama
        from engine.tokenizer import load_tokenizer

        with torch.device("meta"):
            Llama(MODEL_CONFIGS["tiny"])
        load_tokenizer()
    except Exception:  # nothing to warm: the first run reports what is wrong
        pass


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


def run_progress(run_id: int) -> tuple[str, int]:
    """(status, last committed step) read now, uncached: what a replay of a running run polls."""
    reader = RunReader(get_store())
    return reader.run_info(run_id).status, reader.last_step(run_id)


@st.cache_resource(show_spinner=False, max_entries=8)
def _holder_index(url: str, run_id: int, created: str) -> HolderIndex:
    """Keyed by the run's creation time too: a deleted run's id may be given to a new run."""
    reader = RunReader(_store(url))

    def fetch(after: int, upto: int) -> list[Event]:
        return [Event(e.step, e.block_id, e.kind, e.request_id, e.block_hash, e.group_id)
                for e in reader.block_event_list(run_id, after, upto)]

    return HolderIndex(fetch)


def holders_at(run_id: int, step: int, created: str) -> Holders:
    """Every request's block tables after `step` (ui.holders), from process-wide checkpoints."""
    return _holder_index(db_url(), run_id, created).at(step)


# Derived frames: computed once per run revision, then every slider move reuses them ---------
@store_query(max_entries=16)
def step_series(url: str, run_id: int, rev: str) -> pd.DataFrame:
    """Derived per-step metrics (ui.analysis.step_metrics), thinned for drawing."""
    return analysis.downsample(analysis.step_metrics(steps.at(url, run_id, rev)))


@store_query(max_entries=16)
def request_segments(url: str, run_id: int, rev: str, last_step: int) -> pd.DataFrame:
    return timeline.request_segments(request_events.at(url, run_id, rev), last_step)


@store_query(max_entries=16)
def jump_steps(url: str, run_id: int, rev: str) -> dict[str, np.ndarray]:
    """Steps with a preemption, an eviction, a prefix hit (ui.analysis.jump_steps)."""
    return analysis.jump_steps(steps.at(url, run_id, rev))


@store_query(max_entries=16)
def request_table(url: str, run_id: int, rev: str) -> pd.DataFrame:
    return analysis.request_table(requests.at(url, run_id, rev))


# Chart specs of a whole run: built (and validated) once per run revision; Replay layers the
# current step's rule onto copies with ui.charts.with_step_rule.
@store_query(max_entries=96)
def run_chart_spec(url: str, run_id: int, rev: str, name: str, last_step: int,
                   x: str = "step") -> dict:
    """A whole-run chart over steps or (`x="t"`) time, as a Vega-Lite dict whose named
    datasets are Arrow IPC bytes: 'blocks', 'requests_by_state', a PER_STEP_SERIES name or a
    SERIES_LABELS column."""
    series = step_series.at(url, run_id, rev)
    rows = alt.NamedData("rows")
    if name == "blocks":
        mix = analysis.block_mix(series).merge(series[["step", "t"]], on="step")
        return _named(charts.block_mix_chart(rows, x=x), rows=mix)
    if name == "requests_by_state":
        seg = request_segments.at(url, run_id, rev, last_step)
        counts = analysis.downsample(timeline.state_counts(seg, last_step), 4500)
        return _named(timeline.state_counts_chart(rows), rows=counts)
    if name in analysis.PER_STEP_SERIES:
        title, _ = analysis.PER_STEP_SERIES[name]
        return _named(charts.per_step_chart(rows, title, stacked=name == "tokens_per_step",
                                            x=x), rows=analysis.per_step_long(series, name))
    columns = list(dict.fromkeys(["step", x, name]))
    return _named(charts.series_chart(rows, name, x=x), rows=series[columns])


@store_query(max_entries=64)
def timeline_spec(url: str, run_id: int, rev: str, last_step: int, page: int) -> dict:
    """The Gantt chart of one page of requests (ui.timeline.PAGE_SIZE a page)."""
    seg = request_segments.at(url, run_id, rev, last_step)
    shown, first, last = timeline.page_of(seg, page)
    title = (f"request timeline: requests {first:,}-{last:,} of {seg['request_id'].nunique():,}"
             if timeline.num_pages(seg) > 1 else "request timeline")
    return _named(timeline.request_timeline_chart(shown, title=title,
                                                  data=alt.NamedData("segments")),
                  segments=shown)


def _named(chart: Any, **frames: pd.DataFrame) -> dict:
    """A chart that reads named datasets, with those frames as Arrow IPC bytes. Streamlit
    turns a dataset of rows into Arrow at every st.vega_lite_chart call and passes bytes
    through untouched, so this is done once per run, not at every slider move; and Altair
    never sees (nor validates, row by row) the data, which took seconds for 20,000 requests."""
    spec = chart.to_dict()
    spec["datasets"] = {name: _frame_ipc(frame) for name, frame in frames.items()}
    return spec


def _frame_ipc(frame: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(frame, preserve_index=False)
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
