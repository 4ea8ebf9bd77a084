"""Is the process that writes a `running` run still alive?

A run row records its writer's pid, hostname and process start time. On the same host we can
check the pid directly (and the start time guards against pid reuse after a reboot or wrap);
for writers on other hosts (a shared PostgreSQL) we can only trust the heartbeat age.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

import psutil

# A writer refreshes its heartbeat at least this often (store.writer) ...
HEARTBEAT_INTERVAL_S = 30.0
# ... so a remote run silent for this long has lost its writer.
REMOTE_STALE_AFTER = timedelta(minutes=10)


def this_host() -> str:
    return socket.gethostname()


def process_start_time(pid: int | None = None) -> float | None:
    """The process's start time, or None if it is gone (a zombie counts as gone: it was killed)."""
    try:
        process = psutil.Process(pid or os.getpid())
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.Error, OSError):
        return None


def writer_alive(
    pid: int | None,
    host: str | None,
    started: float | None,
    heartbeat_at: datetime | None,
    now: datetime,
) -> bool:
    """True unless we can tell the writer is gone (unknown writers count as gone only if stale)."""
    if host == this_host() and pid is not None:
        actual = process_start_time(pid)
        if actual is None:
            return False
        # create_time() is derived from boot time and clock ticks: allow a little jitter.
        return started is None or abs(actual - started) < 1.0
    if heartbeat_at is None:
        return False
    return now - heartbeat_at < REMOTE_STALE_AFTER
