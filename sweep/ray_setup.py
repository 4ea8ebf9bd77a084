"""Connecting to Ray: a local Ray on this machine by default, or an existing cluster.

Workers import the project from Ray's `working_dir` (the project folder, uploaded once per
content hash and unpacked on each node), so a cluster needs the Python packages of
requirements.txt on its nodes but not a checkout. The virtual environment, the local database
and other bulky folders are excluded.

Ray ties its local processes (GCS, raylet) to the *thread* that started them (Linux
parent-death signal): started from a short-lived thread, such as a Streamlit script run or a
sweep's background thread, they die when it ends. Off the main thread, Ray is therefore started
from a keeper thread that lives as long as the process.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from sweep.spec import SweepError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = ["/.venv", "/data/", "/artifacts/", "/docs/", "/tests/", "/bench/", ".git",
            "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", ".hypothesis"]
START_TIMEOUT_S = 120.0

_lock = threading.Lock()


def runtime_env() -> dict[str, Any]:
    return {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a local Ray (`num_cpus` of this machine's cores, default all) or join the cluster
    at `address` ('auto', 'ray://host:10001', 'host:6379'); no-op when already connected."""
    import ray

    with _lock:
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = dict(address=address, runtime_env=runtime_env(),
                                      log_to_driver=False, logging_level=logging.WARNING)
        if address is None:
            kwargs.update(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
        try:
            if threading.current_thread() is threading.main_thread():
                ray.init(**kwargs)
            else:
                _init_in_keeper_thread(kwargs)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise SweepError(f"cannot start or join {where}: {reason}; check --ray-address "
                             "(`ray status` on the head node prints it)") from exc


def _init_in_keeper_thread(kwargs: dict[str, Any]) -> None:
    import ray

    started = threading.Event()
    failure: list[BaseException] = []

    def keeper() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
            started.set()
            return
        started.set()
        threading.Event().wait()  # keep Ray's processes' parent thread alive

    threading.Thread(target=keeper, name="kvlab-ray", daemon=True).start()
    if not started.wait(START_TIMEOUT_S):
        raise TimeoutError(f"Ray did not start within {START_TIMEOUT_S:.0f} s")
    if failure:
        raise failure[0]


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def max_node_cpus() -> int:
    """The most CPUs one live node has: a point cannot ask for more (Ray would never run it)."""
    import ray

    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def shutdown() -> None:
    """Stop the local Ray (or leave the cluster). A keeper thread, if any, stays parked."""
    import ray

    with _lock:
        if ray.is_initialized():
            ray.shutdown()
