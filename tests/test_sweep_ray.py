"""Sweeps on a real local Ray (2 CPUs, started by this module): every point lands in the store
with its config, failures are recorded while the others finish, a killed worker loses
nothing of the other points, and a stopped sweep resumes with only what is missing."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from store_fixtures import fixture_db_url, fixture_make_db_url  # noqa: F401 (fixtures)

from engine.config import RunConfig, WorkloadSpec
from store import RunReader, open_store
from store import sweeps as store_sweeps
from store.models import Run
from sweep import SweepSpec, create_sweep, execute, parse_axis, ray_setup
from sweep.spec import config_for

TINY = RunConfig(model="tiny", device="cpu", max_model_len=128, keyframe_interval=10,
                 workload=WorkloadSpec(kind="synthetic", num_requests=4, prompt_len_min=16,
                                       prompt_len_max=32, output_len_min=8, output_len_max=16))
# Long enough (a few seconds a point on 2 cores) to be caught mid-run.
SLOW = RunConfig(model="tiny", device="cpu", max_model_len=512, keyframe_interval=10,
                 sampling={"ignore_eos": True},
                 workload=WorkloadSpec(kind="synthetic", num_requests=8, prompt_len_min=16,
                                       prompt_len_max=32, output_len_min=300,
                                       output_len_max=300))


@pytest.fixture(scope="module")
def local_ray():
    ray_setup.connect(num_cpus=2)
    yield
    ray_setup.shutdown()


@pytest.fixture
def store(db_url):
    opened = open_store(db_url)
    yield opened
    opened.dispose()


def test_a_2x2_sweep_lands_every_point_and_fails_only_the_bad_one(local_ray, store):
    spec = SweepSpec(TINY, [parse_axis("block_size=8,16"), parse_axis("num_blocks=8,32")])
    sweep_id = create_sweep(store, spec)
    result = execute(store, sweep_id, max_parallel=2)
    assert result.status == "finished" and result.max_parallel == 2
    points = store_sweeps.sweep_points(store, sweep_id)
    assert points["status"].tolist() == ["failed", "finished", "finished", "finished"]
    assert "invalid combination" in points["error"][0] and "needs 16" in points["error"][0]
    reader = RunReader(store)
    for _, point in points.iloc[1:].iterrows():
        info = reader.run_info(int(point["run_id"]))
        assert info.config == config_for(TINY, {"block_size": point["block_size"],
                                               "num_blocks": point["num_blocks"]})
        assert info.status == "finished" and info.num_steps == len(reader.steps(info.run_id)) > 0
    # A worker process loads the model at most once, across points and sweeps (its cache
    # outlives the task), however many points it runs.
    assert result.model_loads <= len(result.worker_pids) <= 2
    assert store_sweeps.sweep_info(store, sweep_id).status == "finished"
    assert result.to_dict()["finished"] == 3 and result.to_dict()["failed"] == 1


def test_a_point_that_fails_in_its_worker_is_recorded_and_the_others_finish(local_ray, store,
                                                                           tmp_path: Path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hello there", "max_tokens": 4}\n' * 3)
    base = TINY.replace(workload=WorkloadSpec(kind="file", path=str(good)))
    axis = parse_axis(f"workload.path={good},{tmp_path / 'missing.jsonl'}")
    sweep_id = create_sweep(store, SweepSpec(base, [axis, parse_axis("block_size=8,16")]))
    result = execute(store, sweep_id)
    points = store_sweeps.sweep_points(store, sweep_id)
    assert points["status"].tolist() == ["finished", "finished", "failed", "failed"]
    failed = RunReader(store).run_info(int(points["run_id"][2]))
    assert failed.status == "failed" and "missing.jsonl" in failed.error
    assert "missing.jsonl" in points["error"][2] and set(result.errors) == {2, 3}
    assert store_sweeps.sweep_info(store, sweep_id).status == "finished"


def _kill_first_running_writer(store, sweep_id: int, killed: list[int]) -> None:
    """Wait until a run of the sweep has committed steps, then SIGKILL the Ray worker that
    writes it (the run row records its writer's pid)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with store.engine.connect() as conn:
            row = conn.execute(select(Run.id, Run.writer_pid).where(
                Run.sweep_id == sweep_id, Run.status == "running", Run.num_steps > 20)).first()
        if row is not None:
            os.kill(row.writer_pid, signal.SIGKILL)
            killed.append(row.id)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("retries", [0, 1])
@pytest.mark.parametrize("make_db_url", ["sqlite"], indirect=True)
def test_a_killed_worker_fails_or_retries_its_point_and_loses_nothing_else(local_ray, store,
                                                                           retries):
    spec = SweepSpec(SLOW, [parse_axis("block_size=8,16"), parse_axis("max_num_seqs=4,8")])
    sweep_id = create_sweep(store, spec)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_first_running_writer,
                              args=(store, sweep_id, killed), daemon=True)
    killer.start()
    result = execute(store, sweep_id, max_parallel=2, retries=retries)
    killer.join(5)
    assert len(killed) == 1, "no run was caught mid-sweep"
    reader = RunReader(store)
    victim = reader.run_info(killed[0])
    # Closed by the driver, or first by a new worker's open_store (a dead writer's run).
    assert victim.status in ("failed", "interrupted"), victim.status
    assert "died" in victim.error or "stopped" in victim.error
    assert victim.num_steps == len(reader.steps(victim.run_id)) > 20  # its commits are kept
    points = store_sweeps.sweep_points(store, sweep_id)
    hit = int(points.index[points["run_id"] == killed[0]][0]) if retries == 0 else None
    if retries == 0:
        assert points["status"][hit] == "failed" and "worker died" in points["error"][hit]
        assert result.errors.keys() == {hit}
    else:
        assert points["attempts"].max() == 2  # the killed attempt and its retry
    others = points[points["status"] == "finished"]
    assert len(others) == (3 if retries == 0 else 4)
    for run_id in others["run_id"]:
        info = reader.run_info(int(run_id))
        assert info.num_steps == len(reader.steps(info.run_id)) > 0
        assert info.summary["num_finished"] == 8
    assert not (points["status"] == "running").any()


@pytest.mark.parametrize("make_db_url", ["sqlite"], indirect=True)
def test_stop_keeps_finished_points_and_resume_runs_only_the_rest(local_ray, store):
    shorter = WorkloadSpec(kind="synthetic", num_requests=4, prompt_len_min=16,
                           prompt_len_max=32, output_len_min=120, output_len_max=120)
    spec = SweepSpec(SLOW.replace(workload=shorter),
                     [parse_axis("block_size=8,16,32"), parse_axis("max_num_seqs=4,8")])
    sweep_id = create_sweep(store, spec)
    stop = threading.Event()
    result = execute(store, sweep_id, max_parallel=2, should_stop=stop.is_set,
                     on_progress=lambda p: p.done >= 2 and stop.set())
    assert result.status == "interrupted"
    first = store_sweeps.sweep_points(store, sweep_id)
    done = first[first["status"] == "finished"]
    assert 2 <= len(done) < 6
    assert set(first["status"]) <= {"finished", "interrupted", "pending"}
    assert store_sweeps.sweep_info(store, sweep_id).status == "interrupted"
    resumed = execute(store, sweep_id, max_parallel=2)
    assert resumed.status == "finished" and resumed.progress.completed_now == 6 - len(done)
    after = store_sweeps.sweep_points(store, sweep_id)
    assert (after["status"] == "finished").all()
    kept = after.set_index("point").loc[done["point"]]
    assert kept["run_id"].tolist() == done["run_id"].tolist()  # not run again
    assert (kept["attempts"] == 1).all()
