"""The runs this server process is running: they belong to the server, not to a browser tab.

Every LiveRun started from the dashboard is registered here, process-wide, under the store URL
it writes to (tests point each at its own database). A page reload, a second tab or another
page finds the runs still going and reattaches to them: progress, charts and Stop. Finished
runs stay listed for a while so a tab that reattached can show how they ended.

A plain module-level object, not `st.cache_resource`: it must outlive cache clears, and nothing
in it is built from arguments. Thread-safe: sessions run on their own threads.
"""

from __future__ import annotations

import threading
import time

from ui.live_run import LiveRun

KEEP_DONE_S = 15 * 60  # how long a finished run stays listed
MAX_DONE = 20


class RunRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[tuple[str, LiveRun]] = []  # (store URL, run), oldest first

    def add(self, url: str, live: LiveRun) -> None:
        with self._lock:
            self._prune()
            self._runs.append((url, live))

    def active(self, url: str) -> list[LiveRun]:
        """Runs of this store still going (starting, loading or running), oldest first."""
        with self._lock:
            return [live for u, live in self._runs if u == url and not live.done]

    def recent(self, url: str) -> list[LiveRun]:
        """Every run of this store still listed, oldest first."""
        with self._lock:
            self._prune()
            return [live for u, live in self._runs if u == url]

    def find(self, url: str, run_id: int) -> LiveRun | None:
        with self._lock:
            return next((live for u, live in self._runs if u == url and live.run_id == run_id),
                        None)

    def _prune(self) -> None:
        now = time.monotonic()
        done = [(u, r) for u, r in self._runs if r.done]
        stale = {id(r) for u, r in done
                 if r.ended_at is not None and now - r.ended_at > KEEP_DONE_S}
        stale |= {id(r) for u, r in done[:-MAX_DONE]}
        self._runs = [(u, r) for u, r in self._runs if id(r) not in stale]


REGISTRY = RunRegistry()
