"""Cached resources and queries for the pages.

`st.cache_resource` holds the database engine (one `Store` per URL) and loaded models (one per
name, device, dtype and seed); `st.cache_data` holds query results. Query caches are keyed by
the database URL (tests point `$KVLAB_DB_URL` at a fresh file each) and by a run's `rev`
(status and step count) so a run that is still being written is re-read as it grows.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pandas as pd
import streamlit as st

from engine.config import RunConfig
from engine.device import resolve_device, torch_dtype
from engine.trace import BlockState
from store import RunInfo, RunReader, Store, open_store
from ui import analysis, charts, timeline

if TYPE_CHECKING:
    from engine.models.loader import LoadedModel

QUERY_CACHE = 256  # entries per cached query; block states are small, steps frames are not


def db_url() -> str:
    """The URL the store will open ('' means the store's default)."""
    return os.environ.get("KVLAB_DB_URL", "")


@st.cache_resource(show_spinner=False)
def _store(url: str) -> Store:
    return open_store(url or None)


def get_store() -> Store:
    return _store(db_url())


@st.cache_resource(show_spinner=False, max_entries=4)
def _model(name: str, device: str, dtype: str, seed: int) -> LoadedModel:
    from engine.models.loader import load_model  # torch model code: only when a run starts

    return load_model(name, resolve_device(device), torch_dtype(dtype), seed=seed)


def get_model(config: RunConfig) -> LoadedModel:
    """The config's model, loaded once per (name, device, dtype, seed) for the whole server.

    Safe to call from a run's background thread: the cache has its own lock.
    """
    device = resolve_device(config.device)
    # The seed picks the weights of random models only; the real model is one load for all.
    seed = 0 if config.model == "smollm2" else config.seed
    return _model(config.model, device.type, config.resolved_dtype(device.type), seed)


# Queries ------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, ttl=5, max_entries=16)
def _list_runs(url: str, limit: int | None) -> pd.DataFrame:
    store = _store(url)
    # open_store marks dead writers' runs only once, and the store lives as long as the server:
    # a CLI run killed while the dashboard is up would otherwise stay `running` for good.
    store.mark_stale_runs()
    return RunReader(store).list_runs(limit=limit)


def list_runs(limit: int | None = None) -> pd.DataFrame:
    return _list_runs(db_url(), limit)


def refresh_runs() -> None:
    """Forget cached run lists (a run finished, or one was imported or deleted)."""
    _list_runs.clear()


def run_rev(runs: pd.DataFrame, run_id: int) -> str:
    """A cache key part that changes while a run is still being written."""
    row = runs.loc[runs["run_id"] == run_id]
    if row.empty:
        return "?"
    return f"{row['status'].iloc[0]}/{row['num_steps'].iloc[0]}"


def run_label(row: pd.Series) -> str:
    name = row.get("name") or f"run {row['run_id']}"
    return f"#{row['run_id']} {name} ({row['status']}, {row['num_steps']} steps)"


@st.cache_data(show_spinner=False, max_entries=QUERY_CACHE)
def _run_info(url: str, run_id: int, rev: str) -> RunInfo:
    return RunReader(_store(url)).run_info(run_id)


def run_info(run_id: int, rev: str) -> RunInfo:
    return _run_info(db_url(), run_id, rev)


@st.cache_data(show_spinner=False, max_entries=16)
def _steps(url: str, run_id: int, rev: str) -> pd.DataFrame:
    return RunReader(_store(url)).steps(run_id)


def steps(run_id: int, rev: str) -> pd.DataFrame:
    return _steps(db_url(), run_id, rev)


@st.cache_data(show_spinner=False, max_entries=16)
def _request_events(url: str, run_id: int, rev: str) -> pd.DataFrame:
    return RunReader(_store(url)).request_events(run_id)


@st.cache_data(show_spinner=False, max_entries=16)
def _labelled_request_events(url: str, run_id: int, rev: str) -> pd.DataFrame:
    return analysis.with_request_labels(_request_events(url, run_id, rev),
                                        _requests(url, run_id, rev))


def request_events(run_id: int, rev: str) -> pd.DataFrame:
    """The run's request events, each with its request's label (the workload file's id)."""
    return _labelled_request_events(db_url(), run_id, rev)


@st.cache_data(show_spinner=False, max_entries=16)
def _requests(url: str, run_id: int, rev: str) -> pd.DataFrame:
    return RunReader(_store(url)).requests(run_id)


def requests(run_id: int, rev: str) -> pd.DataFrame:
    return _requests(db_url(), run_id, rev)


@st.cache_data(show_spinner=False, max_entries=QUERY_CACHE)
def _block_state_at(url: str, run_id: int, step: int, rev: str) -> BlockState:
    return RunReader(_store(url)).block_state_at(run_id, step)


def block_state_at(run_id: int, step: int, rev: str) -> BlockState:
    return _block_state_at(db_url(), run_id, step, rev)


@st.cache_data(show_spinner=False, max_entries=QUERY_CACHE)
def _block_events_at(url: str, run_id: int, step: int, rev: str) -> pd.DataFrame:
    return RunReader(_store(url)).block_events(run_id, step_from=step, step_to=step)


def block_events_at(run_id: int, step: int, rev: str) -> pd.DataFrame:
    return _block_events_at(db_url(), run_id, step, rev)


# Derived frames: computed once per run revision, then every slider move reuses them ---------
@st.cache_data(show_spinner=False, max_entries=16)
def _step_series(url: str, run_id: int, rev: str) -> pd.DataFrame:
    return analysis.downsample(analysis.step_metrics(_steps(url, run_id, rev)))


def step_series(run_id: int, rev: str) -> pd.DataFrame:
    """Derived per-step metrics (ui.analysis.step_metrics), thinned for drawing."""
    return _step_series(db_url(), run_id, rev)


@st.cache_data(show_spinner=False, max_entries=16)
def _request_segments(url: str, run_id: int, rev: str, last_step: int) -> pd.DataFrame:
    return timeline.request_segments(_request_events(url, run_id, rev), last_step)


# Chart specs of a whole run: built (and validated) once per run revision; Replay layers the
# current step's rule onto copies with ui.charts.with_step_rule.
@st.cache_data(show_spinner=False, max_entries=64)
def _run_chart_spec(url: str, run_id: int, rev: str, name: str, last_step: int) -> dict:
    if name == "blocks":
        chart = charts.block_mix_chart(analysis.block_mix(_step_series(url, run_id, rev)))
    elif name == "requests":
        chart = timeline.request_timeline_chart(
            _request_segments(url, run_id, rev, last_step), title="request timeline")
    else:
        chart = charts.series_chart(_step_series(url, run_id, rev), name)
    return chart.to_dict()


def run_chart_spec(run_id: int, rev: str, name: str, last_step: int) -> dict:
    """'blocks', 'requests' or a ui.analysis.SERIES_LABELS column, as a Vega-Lite dict."""
    return _run_chart_spec(db_url(), run_id, rev, name, last_step)
