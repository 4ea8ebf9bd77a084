"""The sweep driver: one Ray task per point, at most `max_parallel` in flight, outcomes in the
store.

    sweep_id = create_sweep(store, spec)          # the row, with invalid combinations failed
    result = execute(store, sweep_id, on_progress=print, should_stop=stop.is_set)

`execute` also resumes: it runs only the points without a finished run. A failed point (its
run raised, or its worker died and Ray's retries ran out) is recorded as failed and the sweep
goes on. Stopping (`should_stop`, or Ctrl-C raising KeyboardInterrupt) cancels the points not
yet run and interrupts the running ones, whose runs keep every step they made; finished runs
are never touched.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import make_url

from engine.config import ConfigError, RunConfig
from store import Store
from store import sweeps as store_sweeps
from store.liveness import HEARTBEAT_INTERVAL_S
from sweep import ray_setup
from sweep.spec import SweepError, SweepSpec, config_for, point_label

CANCEL_GRACE_S = 30.0  # how long cancelled tasks get to close their runs as interrupted
POLL_S = 0.5


@dataclass
class Progress:
    """Points of the whole sweep by state; `eta_s` extrapolates this session's pace."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    pending: int = 0
    completed_now: int = 0  # finished or failed since this execution started
    started_at: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def eta_s(self) -> float | None:
        left = self.running + self.pending
        if not self.completed_now:
            return None
        return self.elapsed_s / self.completed_now * left


@dataclass
class SweepResult:
    sweep_id: int
    status: str  # finished | interrupted
    progress: Progress
    max_parallel: int
    model_loads: int = 0  # how many times a worker process loaded a model
    worker_pids: set[int] = field(default_factory=set)
    errors: dict[int, str] = field(default_factory=dict)  # point -> error, of this execution

    @property
    def points_per_min(self) -> float:
        elapsed = self.progress.elapsed_s
        return 60.0 * self.progress.completed_now / elapsed if elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        p = self.progress
        return {"sweep_id": self.sweep_id, "status": self.status, "points": p.total,
                "finished": p.done, "failed": p.failed, "not_run": p.pending + p.running,
                "ran_now": p.completed_now, "elapsed_s": round(p.elapsed_s, 3),
                "points_per_min": round(self.points_per_min, 2),
                "max_parallel": self.max_parallel, "model_loads": self.model_loads,
                "worker_processes": len(self.worker_pids),
                "errors": {str(k): v for k, v in sorted(self.errors.items())}}


def worker_url(store: Store) -> str:
    """The store's URL as workers must see it: a SQLite path made absolute (a worker runs in
    Ray's copy of the project, not in this folder)."""
    url = make_url(store.url)
    if url.get_backend_name() != "sqlite":
        return store.url
    if url.database in (None, "", ":memory:"):
        raise SweepError("an in-memory SQLite database cannot be shared with Ray workers; "
                         "give --db a file (sqlite:///data/kvlab.db) or a PostgreSQL URL")
    from pathlib import Path

    return url.set(database=str(Path(url.database).expanduser().resolve())).render_as_string(
        hide_password=False)


def create_sweep(store: Store, spec: SweepSpec) -> int:
    """Insert the sweep row; points whose values are invalid together are failed from the
    start (their ConfigError is their error)."""
    errors = {i: f"invalid combination: {c}" for i, c in enumerate(spec.point_configs())
              if isinstance(c, ConfigError)}
    return store_sweeps.create_sweep(store, name=spec.name, spec=spec.to_dict(),
                                     points=spec.points(), point_errors=errors)


def _point_configs(info: store_sweeps.SweepInfo) -> list[RunConfig | None]:
    base = RunConfig.from_dict(info.spec["base"])
    configs: list[RunConfig | None] = []
    for point in info.points:
        try:
            configs.append(config_for(base, point["values"]))
        except ConfigError:
            configs.append(None)  # failed at creation; stays failed
    return configs


def execute(store: Store, sweep_id: int, *, ray_address: str | None = None,
            max_parallel: int | None = None, num_cpus: int | None = None, retries: int = 1,
            threads_per_point: int | None = None,
            on_progress: Callable[[Progress], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> SweepResult:
    """Run the sweep's points that have no finished run; see the module docstring.

    `num_cpus` sizes a local Ray (default: all cores); `retries` is how often Ray reruns a
    point whose worker died. Each point reserves `threads_per_point` CPUs and runs torch with
    that many threads (default: the cluster's CPUs / `max_parallel`, so the points in flight
    share the cores without oversubscribing them; see bench/sweep_scaling.py for when one
    thread a point is the better choice).
    """
    info = store_sweeps.claim_sweep(store, sweep_id)
    try:
        configs, todo, progress = _plan(store, info)
        if not todo:  # a resume with nothing missing: no need for Ray
            store_sweeps.end_sweep(store, sweep_id, "finished")
            return SweepResult(sweep_id, "finished", progress, 0)
        ray_setup.connect(ray_address, num_cpus)
        progress.started_at = time.monotonic()  # pace (ETA, points/min) without Ray's start
        parallel = max(1, min(max_parallel or ray_setup.cluster_cpus(), max(1, len(todo))))
        result = SweepResult(sweep_id, "running", progress, parallel)
        threads = threads_per_point or max(1, ray_setup.cluster_cpus() // parallel)
        if threads > ray_setup.max_node_cpus():
            raise SweepError(f"{threads} threads per point is more than any Ray node has "
                             f"({ray_setup.max_node_cpus()} CPUs); lower --threads-per-point")
        dispatcher = _Dispatcher(store, info, configs, result, retries, threads)
    except BaseException as exc:
        store_sweeps.end_sweep(store, sweep_id, "failed", _one_line(exc))
        raise
    try:
        dispatcher.run(deque(todo), on_progress, should_stop)
    except BaseException:  # Ctrl-C, or the driver itself failed: nothing more runs
        dispatcher.cancel_all()
        result.status = "interrupted"
        store_sweeps.end_sweep(store, sweep_id, "interrupted", "the driver was stopped")
        raise
    finally:
        if on_progress is not None:
            on_progress(progress)
    store_sweeps.end_sweep(store, sweep_id, result.status)
    return result


def _plan(store: Store, info: store_sweeps.SweepInfo
          ) -> tuple[list[RunConfig | None], list[int], Progress]:
    """Each point's config, the points to run now (no finished run yet) and the progress."""
    # A previous driver's runs that never ended: their tasks died with it.
    store_sweeps.close_orphan_runs(store, info.sweep_id, "interrupted",
                                   "the sweep stopped before this run ended")
    configs = _point_configs(info)
    states = store_sweeps.sweep_points(store, info.sweep_id)["status"].tolist()
    todo = [i for i, c in enumerate(configs) if c is not None and states[i] != "finished"]
    store_sweeps.set_point_errors(store, info.sweep_id, {i: None for i in todo})
    progress = Progress(total=len(configs), done=states.count("finished"),
                        failed=sum(c is None for c in configs), pending=len(todo))
    return configs, todo, progress


class _Dispatcher:
    """Submits points as Ray tasks, `max_parallel` at a time, and records each outcome."""

    def __init__(self, store: Store, info: store_sweeps.SweepInfo,
                 configs: list[RunConfig | None], result: SweepResult, retries: int,
                 threads: int) -> None:
        import ray

        from sweep.worker import run_point

        self.store, self.info, self.configs, self.result = store, info, configs, result
        self.url = worker_url(store)
        self.threads = threads
        self.task = ray.remote(run_point).options(
            num_cpus=self.threads, max_retries=retries, retry_exceptions=False)
        self.in_flight: dict[Any, int] = {}

    def submit(self, point: int) -> None:
        config = self.configs[point]
        assert config is not None
        name = f"sweep {self.info.sweep_id} #{point} " + point_label(
            self.info.points[point]["values"])
        # Ray hides GPUs from tasks that do not reserve one (CUDA_VISIBLE_DEVICES=""), so a
        # point that asks for CUDA reserves a GPU; "auto" stays on the CPU under Ray.
        task = self.task.options(num_gpus=1) if config.device == "cuda" else self.task
        ref = task.remote(self.url, config.to_json(), sweep_id=self.info.sweep_id,
                          point=point, name=name.strip(), torch_threads=self.threads)
        self.in_flight[ref] = point

    def run(self, queue: deque[int], on_progress: Callable[[Progress], None] | None,
            should_stop: Callable[[], bool] | None) -> None:
        import ray

        progress = self.result.progress
        last_beat = time.monotonic()
        while queue or self.in_flight:
            if time.monotonic() - last_beat > HEARTBEAT_INTERVAL_S:
                store_sweeps.heartbeat(self.store, self.info.sweep_id)
                last_beat = time.monotonic()
            if should_stop is not None and should_stop():
                self.cancel_all()
                self.result.status = "interrupted"
                return
            while queue and len(self.in_flight) < self.result.max_parallel:
                self.submit(queue.popleft())
            progress.pending, progress.running = len(queue), len(self.in_flight)
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                self.collect(ref, self.in_flight.pop(ref))
            progress.running = len(self.in_flight)
            if on_progress is not None:
                on_progress(progress)
        # Runs of attempts that Ray retried after their worker died were never closed.
        store_sweeps.close_orphan_runs(self.store, self.info.sweep_id, "failed",
                                       "the worker process died before closing this run")
        self.result.status = "finished"

    def collect(self, ref: Any, point: int) -> None:
        import ray
        from ray.exceptions import RayTaskError

        progress = self.result.progress
        progress.completed_now += 1
        try:
            out = ray.get(ref)
        except RayTaskError as exc:  # the point's own error; its run row says it in full
            self._failed(point, _one_line(getattr(exc, "cause", None) or exc), worker_died=False)
            return
        except ray.exceptions.RayError as exc:  # the worker died (and retries ran out), OOM...
            self._failed(point, f"the Ray worker died: {_one_line(exc)}", worker_died=True)
            return
        progress.done += 1
        self.result.worker_pids.add(out["pid"])
        self.result.model_loads += bool(out["model_loaded"])

    def _failed(self, point: int, message: str, *, worker_died: bool) -> None:
        self.result.progress.failed += 1
        self.result.errors[point] = message
        if worker_died:
            store_sweeps.close_orphan_runs(self.store, self.info.sweep_id, "failed", message,
                                           points=[point])
        store_sweeps.set_point_errors(self.store, self.info.sweep_id, {point: message})

    def cancel_all(self) -> None:
        """Cancel every task in flight, give them a moment to close their runs as interrupted,
        then close whatever they left open."""
        import ray

        refs = list(self.in_flight)
        for ref in refs:
            ray.cancel(ref)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
        store_sweeps.close_orphan_runs(self.store, self.info.sweep_id, "interrupted",
                                       "the sweep was stopped",
                                       points=list(self.in_flight.values()))
        self.in_flight.clear()


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = type(exc).__name__
    return f"{name}: {lines[0]}" if lines else name
