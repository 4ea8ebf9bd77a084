"""A run in a background thread, so Streamlit reruns never interrupt the engine.

A page keeps one `LiveRun` in `st.session_state`, starts it, and redraws from it on a timer
(`st.fragment(run_every=...)`). Stop sets an event the engine polls every step: the run ends
cleanly, unfinished requests are recorded as aborted, and the writer closes the run as
interrupted with its summary, so nothing that was traced is lost.

Fields written by the thread are only ever replaced or appended to (one writer), so the page
reads them without a lock; a page may see a step list one record short, never a torn one.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from engine.config import RunConfig
from engine.trace import (
    BlockEvent,
    Keyframe,
    RequestEvent,
    RequestRecord,
    StepRecord,
    TelemetrySample,
    TraceSink,
)
from engine.workload import build_workload
from store import RunWriter, Store

if TYPE_CHECKING:
    from engine.models.loader import LoadedModel


class _CountingSink:
    """Forwards to the run's writer and counts requests that are done (finished, rejected,
    aborted) for the progress bar."""

    def __init__(self, inner: TraceSink, live: LiveRun):
        self.inner, self.live = inner, live

    def record_step(self, step: StepRecord, block_events: Sequence[BlockEvent],
                    request_events: Sequence[RequestEvent]) -> None:
        self.inner.record_step(step, block_events, request_events)

    def record_request(self, request: RequestRecord) -> None:
        self.inner.record_request(request)
        self.live.requests_done += 1

    def record_keyframe(self, keyframe: Keyframe) -> None:
        self.inner.record_keyframe(keyframe)

    def record_telemetry(self, sample: TelemetrySample) -> None:
        self.inner.record_telemetry(sample)


class LiveRun:
    """One run on a background thread: phase, progress, the StepRecords so far, the outcome.

    phase: "starting" -> "loading model" -> "running" -> "finished" | "interrupted" | "failed".
    Only the thread writes the fields; `stop()` is the only call that changes its course.
    """

    DONE_PHASES = ("finished", "interrupted", "failed")

    def __init__(self, store: Store, config: RunConfig, *, name: str | None = None,
                 tags: Sequence[str] = (), load: Callable[[RunConfig], LoadedModel]):
        self.store, self.config, self.name, self.tags = store, config, name, tuple(tags)
        self._load = load
        self.phase = "starting"
        self.run_id: int | None = None
        self.steps: list[StepRecord] = []
        self.requests_total: int | None = None
        self.requests_done = 0
        self.summary: dict[str, Any] | None = None
        self.error: str | None = None  # one line: the exception's type and message
        self.traceback: str | None = None  # the whole story, for a "details" expander
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self._stop = threading.Event()
        # the run row exists (it appears with the first keyframe, after the model loads), or
        # the run ended before that
        self._registered = threading.Event()
        self._thread = threading.Thread(target=self._main, name="kvlab-run", daemon=True)

    # Control ----------------------------------------------------------------------------------
    def start(self) -> LiveRun:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the engine to end after the current step (the run is kept, as interrupted)."""
        self._stop.set()

    def wait_registered(self, timeout: float = 5.0) -> int | None:
        """Wait until the run is in the database (so lists show it); returns its id."""
        self._registered.wait(timeout)
        return self.run_id

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # State for the page -----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.phase in self.DONE_PHASES

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() and not self.done

    @property
    def progress(self) -> float:
        if not self.requests_total:
            return 0.0
        return min(1.0, self.requests_done / self.requests_total)

    @property
    def elapsed_s(self) -> float:
        return (self.ended_at or time.monotonic()) - self.started_at

    def steps_frame(self) -> pd.DataFrame:
        records = list(self.steps)  # a snapshot: the thread keeps appending
        if not records:
            return pd.DataFrame(columns=list(StepRecord.__slots__))
        return pd.DataFrame([{k: getattr(r, k) for k in StepRecord.__slots__} for r in records])

    # The thread -------------------------------------------------------------------------------
    def _on_open(self, run_id: int) -> None:
        self.run_id = run_id
        self._registered.set()

    def _main(self) -> None:
        from engine.run import run  # the engine's model code loads with the first run

        writer: RunWriter | None = None
        try:
            writer = RunWriter(self.store, self.config, name=self.name, tags=self.tags,
                               on_open=self._on_open)
            requests = build_workload(self.config.workload, self.config.seed)
            self.requests_total = len(requests)
            self.phase = "loading model"
            model = self._load(self.config)
            writer.set_device(str(model.device), self.config.model)
            self.phase = "running"
            result = run(self.config, _CountingSink(writer, self), model=model,
                         requests=requests, on_step=self.steps.append,
                         should_stop=self._stop.is_set)
            self.summary = result.summary.to_dict()
            writer.close(summary=self.summary, interrupted=result.summary.stopped)
            self.phase = "interrupted" if result.summary.stopped else "finished"
        except Exception as e:  # shown on the page; the run row keeps the traceback
            self.error = f"{type(e).__name__}: {e}"
            self.traceback = traceback.format_exc()
            if writer is not None:
                try:
                    writer.close(error=self.traceback)
                except Exception:  # the database itself may be what failed
                    self.error += " (and the run could not be closed in the database)"
                    self.traceback += "\nClosing the run failed:\n" + traceback.format_exc()
            self.phase = "failed"
        finally:
            self.ended_at = time.monotonic()
            self._registered.set()
