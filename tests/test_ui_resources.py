"""ui.resources' @store_query: each query is cached per store URL (a page never sees another
store's answer), `rev` invalidates a run's entries, and refresh_runs() forgets run lists."""

from __future__ import annotations

from store_fixtures import FAKE_CONFIG, fake_run

from store import RunWriter, open_store
from ui import resources


def record(store, steps: int, name: str) -> int:
    writer = RunWriter(store, FAKE_CONFIG, name=name)
    fake_run(writer, steps)
    writer.close(summary={"steps": steps})
    return writer.run_id


def test_queries_are_cached_per_store_url(tmp_path, monkeypatch):
    url_a, url_b = (f"sqlite:///{tmp_path / name}.db" for name in ("a", "b"))
    store_a, store_b = open_store(url_a), open_store(url_b)
    try:
        first = record(store_a, 12, "in a")
        monkeypatch.setenv("KVLAB_DB_URL", url_a)
        assert resources.list_runs()["name"].tolist() == ["in a"]
        monkeypatch.setenv("KVLAB_DB_URL", url_b)
        assert resources.list_runs().empty  # not a's cached answer
        record(store_b, 5, "in b")
        resources.refresh_runs()  # (run lists are cached for a few seconds otherwise)
        assert resources.list_runs()["name"].tolist() == ["in b"]
        monkeypatch.setenv("KVLAB_DB_URL", url_a)
        assert len(resources.steps(first, "finished/12")) == 12
        assert resources.steps.at(url_a, first, "finished/12").equals(
            resources.steps(first, "finished/12"))
    finally:
        store_a.dispose()
        store_b.dispose()


def test_rev_invalidates_a_growing_run(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'grow.db'}"
    monkeypatch.setenv("KVLAB_DB_URL", url)
    store = open_store(url)
    try:
        writer = RunWriter(store, FAKE_CONFIG, name="growing", flush_interval_s=0.01)
        truth = fake_run(writer, 6)
        writer.flush()
        assert len(resources.steps(writer.run_id, "running/6")) == 6
        for step in range(7, 10):  # more steps, as a live run makes them
            writer.record_step(*_step_of(truth, step))
        writer.close()
        assert len(resources.steps(writer.run_id, "running/6")) == 6  # same rev: cached
        assert len(resources.steps(writer.run_id, "finished/9")) == 9
    finally:
        store.dispose()


def _step_of(truth, step):
    """A StepRecord after `truth`'s last step: nothing happens in the cache."""
    from engine.trace import StepRecord

    last = truth[-1]
    used = sum(r > 0 for r in last.ref_counts)
    free = len(last.free_queue)
    return (StepRecord(step, step * 0.01, 0.001, 0, 0, 0, 0, 0, 0, used, free, 0, 0, 0, 0,
                       0, 0), [], [])
