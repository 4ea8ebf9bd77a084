"""Per-browser-session state: the one live run a session may have, and the demo's config."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from engine.config import RunConfig, WorkloadSpec
from ui import resources
from ui.live_run import LiveRun

LIVE_KEY = "live_run"
DEMO_TAG = "demo"


def init_state() -> None:
    """Set the session's keys once; later reruns keep what is there."""
    if LIVE_KEY not in st.session_state:
        st.session_state[LIVE_KEY] = None


def live_run() -> LiveRun | None:
    init_state()
    return st.session_state[LIVE_KEY]


def is_running() -> bool:
    live = live_run()
    return live is not None and not live.done


def start_run(config: RunConfig, *, name: str | None = None,
              tags: Sequence[str] = ()) -> LiveRun:
    """Start `config` on a background thread and make it this session's live run."""
    live = LiveRun(resources.get_store(), config, name=name, tags=tags,
                   load=resources.get_model).start()
    st.session_state[LIVE_KEY] = live
    live.wait_registered()
    resources.refresh_runs()
    return live


def demo_config() -> RunConfig:
    """The bundled model serving eight chats that share a system prompt, in a cache small
    enough that the grid is readable and the prefix hits, reuse and LRU order all show."""
    return RunConfig(
        model="smollm2",
        device="auto",
        block_size=16,
        num_blocks=64,
        max_model_len=512,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        keyframe_interval=10,
        workload=WorkloadSpec(kind="preset", name="shared-prefix"),
    )
