"""A sweep driven from a background thread, so Streamlit reruns never interrupt it.

The page creates the sweep row at once (so its id is known and the results view can follow it)
and this thread runs `sweep.execute` on a local Ray. Stop sets an event the driver polls: the
points not yet run are cancelled and the running ones stop after their current step, kept as
interrupted runs; a later resume runs what is missing.

The thread replaces `progress` with a fresh copy on each update (one writer), so the page reads
it without a lock.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from store import Store
from sweep.driver import Progress, SweepResult, create_sweep, execute
from sweep.spec import SweepSpec


class LiveSweep:
    """phase: "starting Ray" -> "running" -> "finished" | "interrupted" | "failed"."""

    DONE_PHASES = ("finished", "interrupted", "failed")

    def __init__(self, store: Store, spec: SweepSpec, *, max_parallel: int,
                 sweep_id: int | None = None) -> None:
        self.store, self.spec, self.max_parallel = store, spec, max_parallel
        self.sweep_id = sweep_id if sweep_id is not None else create_sweep(store, spec)
        self.phase = "starting Ray"
        self.progress = Progress(total=spec.num_points)
        self.result: SweepResult | None = None
        self.error: str | None = None
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"kvlab-sweep-{self.sweep_id}",
                                        daemon=True)

    def start(self) -> LiveSweep:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def done(self) -> bool:
        return self.phase in self.DONE_PHASES

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() and not self.done

    @property
    def fraction(self) -> float:
        p = self.progress
        return min(1.0, (p.done + p.failed) / p.total) if p.total else 0.0

    def progress_text(self) -> str:
        p = self.progress
        eta = f", about {p.eta_s:.0f} s left" if p.eta_s is not None and not self.done else ""
        phase = "stopping" if self.stopping else self.phase
        return (f"{phase}: {p.done}/{p.total} points done, {p.failed} failed, {p.running} "
                f"running, {p.pending} waiting{eta}")

    def _update(self, progress: Progress) -> None:
        self.phase = "running" if not self._stop.is_set() else self.phase
        self.progress = dataclasses.replace(progress)

    def _main(self) -> None:
        try:
            self.result = execute(self.store, self.sweep_id, max_parallel=self.max_parallel,
                                  on_progress=self._update, should_stop=self._stop.is_set)
            self.progress = dataclasses.replace(self.result.progress)
            self.phase = self.result.status
        except Exception as exc:  # shown on the page; the sweep row keeps it too
            self.error = f"{type(exc).__name__}: {exc}"
            self.phase = "failed"
