"""One sweep point inside a Ray worker: its config through the engine, its trace into the store.

Ray keeps worker processes alive between tasks, so the loaded model and the open store are
cached per process: a worker loads a model once for all the points it runs (the first point
it runs pays the load, and says so in its result). Ray sets the process's OpenMP threads from
the task's `num_cpus`; torch's own pool is set here to the same count, so parallel workers
share the cores instead of each taking all of them. A cancel (the sweep's Stop, Ctrl-C) stops
the engine cleanly after its current step (see `_stop_on_cancel`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from engine.config import RunConfig
from engine.models.loader import LoadedModel
from engine.run import load_model_for, run
from store import RunWriter, Store, open_store

MAX_CACHED_MODELS = 2  # SmolLM2 is ~0.5 GB in fp32 per worker; a seed axis on tiny makes many

_models: OrderedDict[tuple[str, str, str, int], LoadedModel] = OrderedDict()
_stores: dict[str, Store] = {}


def cached_model(config: RunConfig) -> tuple[LoadedModel, bool]:
    """The config's model, loaded in this process at most once; and whether this call loaded
    it."""
    from engine.device import resolve_device

    device = resolve_device(config.device)
    # The seed picks the weights of random models only; the real model is one load for all.
    seed = 0 if config.model == "smollm2" else config.seed
    key = (config.model, device.type, config.resolved_dtype(device.type), seed)
    if key in _models:
        _models.move_to_end(key)
        return _models[key], False
    _models[key] = load_model_for(config.replace(seed=seed))
    while len(_models) > MAX_CACHED_MODELS:
        _models.popitem(last=False)
    return _models[key], True


def cached_store(url: str) -> Store:
    if url not in _stores:
        _stores[url] = open_store(url)
    return _stores[url]


@contextmanager
def _stop_on_cancel() -> Iterator[threading.Event]:
    """An event set when Ray cancels this task.

    Ray cancels a running task by simulating SIGINT in the worker's main thread
    (`_thread.interrupt_main`), which by default raises KeyboardInterrupt wherever the code is,
    possibly inside a database transaction that then never ends (and keeps SQLite locked).
    Handling the signal turns the cancel into the engine's own clean stop, polled every step.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers live on the main thread; a cancel then raises as usual
        return
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def run_point(db_url: str, config_json: str, *, sweep_id: int, point: int, name: str,
              torch_threads: int) -> dict[str, Any]:
    """Run one point and store it as a run of the sweep; returns its run id and timings.

    A failure closes the run as failed (with the traceback) and is raised again for Ray to
    report; a cancel stops the engine after its current step and closes the run as
    interrupted, with every step it made.
    """
    torch.set_num_threads(max(1, torch_threads))
    config = RunConfig.from_json(config_json)
    writer = RunWriter(cached_store(db_url), config, name=name, tags=("sweep",),
                       sweep_id=sweep_id, sweep_point=point)
    started = time.monotonic()
    with _stop_on_cancel() as stop:
        try:
            model, loaded = cached_model(config)
            load_s = time.monotonic() - started
            writer.set_device(str(model.device), config.model)
            result = run(config, writer, model=model, should_stop=stop.is_set)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            try:
                writer.close(error=None if interrupted else traceback.format_exc(),
                             interrupted=interrupted)
            except Exception:  # noqa: S110 - the run's own error is the one to report
                pass
            raise
        writer.close(summary=result.summary, interrupted=result.summary.stopped)
    return {"point": point, "run_id": writer.run_id, "pid": os.getpid(),
            "model_loaded": loaded, "load_s": load_s, "stopped": result.summary.stopped,
            "run_s": time.monotonic() - started - load_s}
