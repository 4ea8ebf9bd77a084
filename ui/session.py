"""Per-browser-session state: the run a session watches, the server's runs, and the demo.

A run belongs to the server (ui.run_registry), not to the tab that started it: a session
watches one run, the one it started or, after a reload or in a new tab, the oldest one still
going, and every page lists the runs still going with their Stop buttons.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from engine.config import RunConfig, SamplingConfig, WorkloadSpec
from ui import resources
from ui.live_run import LiveRun
from ui.run_registry import REGISTRY

LIVE_KEY = "live_run"
DEMO_TAG = "demo"


def init_state() -> None:
    """Set the session's keys once; later reruns keep what is there."""
    if LIVE_KEY not in st.session_state:
        st.session_state[LIVE_KEY] = None
    resources.start_warm_up()


def live_run() -> LiveRun | None:
    """The run this session watches; a session without one (a reload, a new tab) reattaches
    to the oldest run still going on this server, so its progress and Stop are not lost."""
    init_state()
    if st.session_state[LIVE_KEY] is None:
        active = active_runs()
        if active:
            st.session_state[LIVE_KEY] = active[0]
    return st.session_state[LIVE_KEY]


def active_runs() -> list[LiveRun]:
    """The runs still going on this server (for this store), oldest first."""
    return REGISTRY.active(resources.db_url())


def is_running() -> bool:
    """True while any run of this server is going: one at a time, unless a person asks for
    another beside it."""
    return bool(active_runs())


def start_run(config: RunConfig, *, name: str | None = None,
              tags: Sequence[str] = ()) -> LiveRun:
    """Start `config` on a background thread, register it with the server, and watch it."""
    live = LiveRun(resources.get_store(), config, name=name, tags=tags,
                   load=resources.get_model).start()
    REGISTRY.add(resources.db_url(), live)
    st.session_state[LIVE_KEY] = live
    live.wait_registered()
    resources.refresh_runs()
    return live


def demo_config() -> RunConfig:
    """The bundled model serving the "demo" preset's three waves of chats in a cache too small
    for all of them, so one short run shows prefix sharing, LRU eviction of cached free blocks,
    a preemption and its recompute, and prefix re-hits after eviction. EOS is ignored so the
    steps (and the replay's story) are the same on every machine and with every model."""
    return RunConfig(
        model="smollm2",
        device="auto",
        block_size=16,
        num_blocks=36,
        max_model_len=384,
        max_num_seqs=6,
        max_num_batched_tokens=512,
        keyframe_interval=10,
        sampling=SamplingConfig(ignore_eos=True),
        workload=WorkloadSpec(kind="preset", name="demo"),
    )
