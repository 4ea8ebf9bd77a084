"""Store round trips: what RunWriter records reads back identical, before and after a move
through a trace file into a fresh database; block_state_at equals the true state every step."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import func, select
from store_fixtures import (  # noqa: F401 (fixtures)
    FAKE_CONFIG,
    ROOT,
    assert_events_rebuild_keyframes,
    fake_run,
    fixture_db_url,
    fixture_make_db_url,
    fixture_trace_store,
)

from engine.run_result import RunSummary
from engine.trace import ListSink
from store import (
    RunReader,
    RunWriter,
    StoreError,
    delete_run,
    export_run,
    import_run,
    open_store,
    rename_run,
)
from store.models import CHILD_TABLES
from store.portable import file_sha256
from store.reader import BLOCK_EVENT_DTYPES, REQUEST_DTYPES, STEP_DTYPES, frame

SUMMARY = RunSummary(
    num_requests=10, num_finished=9, num_rejected=1, prompt_tokens=640, output_tokens=80,
    steps=300, elapsed_s=1.5, output_tokens_per_s=53.3, prefix_hit_rate=0.25,
    num_preemptions=2, num_evictions=7, peak_blocks_used=40, num_blocks=48,
    kv_bytes_per_token=256, device="cpu", dtype="float32", kv_dtype="fp32")


class TeeSink:
    """Sends the trace to a RunWriter and keeps an in-memory copy to compare against."""

    def __init__(self, writer: RunWriter) -> None:
        self.writer, self.copy = writer, ListSink()

    def record_step(self, step, block_events, request_events) -> None:
        self.writer.record_step(step, block_events, request_events)
        self.copy.record_step(step, block_events, request_events)

    def record_request(self, request) -> None:
        self.writer.record_request(request)
        self.copy.record_request(request)

    def record_keyframe(self, keyframe) -> None:
        self.writer.record_keyframe(keyframe)
        self.copy.record_keyframe(keyframe)


def record(store, steps: int = 300, seed: int = 0, **writer_kwargs):
    writer = RunWriter(store, FAKE_CONFIG, name=f"fake-{seed}", tags=["test", "fake"],
                       **writer_kwargs)
    writer.set_device("cpu", "tiny")
    tee = TeeSink(writer)
    truth = fake_run(tee, steps, seed=seed)
    writer.close(summary=SUMMARY)
    return writer.run_id, tee.copy, truth


def as_rows(items) -> list[tuple]:
    return [dataclasses.astuple(i) for i in items]


def test_writer_records_what_the_engine_sent(trace_store) -> None:
    run_id, sent, truth = record(trace_store)
    reader = RunReader(trace_store)
    pd.testing.assert_frame_equal(reader.steps(run_id), frame(as_rows(sent.steps), STEP_DTYPES))
    pd.testing.assert_frame_equal(reader.requests(run_id),
                                  frame(as_rows(sent.requests), REQUEST_DTYPES))
    events = reader.block_events(run_id)
    pd.testing.assert_frame_equal(events, frame(as_rows(sent.block_events), BLOCK_EVENT_DTYPES))
    assert list(reader.request_events(run_id).itertuples(index=False, name=None)) == \
        as_rows(sent.request_events)
    window = reader.block_events(run_id, step_from=50, step_to=60)
    assert window.step.between(50, 60).all()
    assert len(window) == sum(50 <= e.step <= 60 for e in sent.block_events)
    info = reader.run_info(run_id)
    assert (info.status, info.config, info.summary) == ("finished", FAKE_CONFIG, SUMMARY.to_dict())
    assert (info.device, info.model, info.tags, info.num_steps) == ("cpu", "tiny",
                                                                    ["test", "fake"], 300)
    assert reader.last_step(run_id) == 300
    assert reader.keyframe_steps(run_id) == [k.step for k in sent.keyframes]


def test_block_state_at_equals_true_state_every_step(trace_store) -> None:
    run_id, _, truth = record(trace_store, steps=200, seed=3)
    reader = RunReader(trace_store)
    for step, expected in enumerate(truth):
        assert reader.block_state_at(run_id, step).to_keyframe(step) == expected, step


def test_export_import_round_trip(trace_store, make_db_url, tmp_path: Path) -> None:
    run_id, _, truth = record(trace_store, steps=250, seed=1)
    path = export_run(trace_store, run_id, tmp_path / "run.kvtrace.zip")
    fresh = open_store(make_db_url())
    try:
        new_id = import_run(fresh, path)
        a, b = RunReader(trace_store), RunReader(fresh)
        for method in ("steps", "block_events", "request_events", "requests"):
            pd.testing.assert_frame_equal(getattr(a, method)(run_id), getattr(b, method)(new_id))
        info_a, info_b = a.run_info(run_id), b.run_info(new_id)
        assert dataclasses.replace(info_a, run_id=new_id, import_sha256=file_sha256(path)) == info_b
        assert not info_a.imported and info_b.imported
        for step in (0, 1, 9, 10, 11, 137, 250):
            assert b.block_state_at(new_id, step).to_keyframe(step) == truth[step]
            assert b.block_state_at(new_id, step) == a.block_state_at(run_id, step)
    finally:
        fresh.dispose()


def test_delete_removes_every_row(trace_store) -> None:
    keep, _, _ = record(trace_store, steps=40, seed=1)
    gone, _, _ = record(trace_store, steps=40, seed=2)
    delete_run(trace_store, gone)
    with trace_store.engine.connect() as conn:
        for model in CHILD_TABLES:
            count = select(func.count()).select_from(model).where(model.run_id == gone)
            assert conn.execute(count).scalar() == 0, model.__tablename__
    reader = RunReader(trace_store)
    assert reader.list_runs().run_id.tolist() == [keep]
    assert reader.last_step(keep) == 40
    with pytest.raises(StoreError, match=f"no run {gone}"):
        delete_run(trace_store, gone)


def test_rename_sets_and_clears_the_name(trace_store) -> None:
    run_id, _, _ = record(trace_store, steps=5, seed=1)
    reader = RunReader(trace_store)
    rename_run(trace_store, run_id, "  baseline, 64 blocks ")
    assert reader.run_info(run_id).name == "baseline, 64 blocks"
    assert reader.list_runs()["name"].tolist() == ["baseline, 64 blocks"]
    rename_run(trace_store, run_id, "   ")
    assert reader.run_info(run_id).name is None
    with pytest.raises(StoreError, match="at most 200 characters"):
        rename_run(trace_store, run_id, "x" * 201)
    with pytest.raises(StoreError, match=f"no run {run_id + 1}"):
        rename_run(trace_store, run_id + 1, "nope")


def test_block_event_list_is_the_frame_as_records(trace_store) -> None:
    run_id, _, _ = record(trace_store, steps=40, seed=3)
    reader = RunReader(trace_store)
    events = reader.block_event_list(run_id, after=9, upto=20)
    frame_ = reader.block_events(run_id, step_from=10, step_to=20)
    assert events and {e.step for e in events} <= set(range(10, 21))
    assert [(e.step, e.block_id, e.kind, e.request_id, e.block_hash) for e in events] == [
        (r.step, r.block_id, r.kind, None if pd.isna(r.request_id) else r.request_id,
         None if pd.isna(r.block_hash) else r.block_hash) for r in frame_.itertuples()]


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes | None]) -> Path:
    """`src` with members replaced (None: removed). The manifest's checksums are updated to the
    replaced tables, so each case meets the check it is about, not the checksum's."""
    with zipfile.ZipFile(src) as zin:
        members = {i.filename: replace.get(i.filename, zin.read(i.filename))
                   for i in zin.infolist()}
    manifest = json.loads(members["manifest.json"])
    for name, entry in manifest["tables"].items():
        if members.get(f"{name}.parquet") is not None and "sha256" in entry:
            entry["sha256"] = hashlib.sha256(members[f"{name}.parquet"]).hexdigest()
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in members.items():
            if data is not None:
                zout.writestr(name, data)
    return dst


def _edit_table(src: Path, dst: Path, table: str) -> Path:
    """`src` with one table's file edited after export: its checksum no longer matches."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == f"{table}.parquet":
                data = data[:-12] + bytes(b ^ 1 for b in data[-12:-8]) + data[-8:]
            zout.writestr(item.filename, data)
    return dst


def test_a_trace_file_from_before_groups_imports_and_replays(trace_store) -> None:
    """tests/data/trace-format-v1.kvtrace.zip was exported by kvlab at trace format 1 (no KV
    cache groups, every free at the queue's tail): it imports with the defaults and replays."""
    run_id = import_run(trace_store, ROOT / "tests" / "data" / "trace-format-v1.kvtrace.zip")
    reader = RunReader(trace_store)
    assert reader.run_info(run_id).name == "recorded before groups"
    assert assert_events_rebuild_keyframes(reader, run_id) == [0, 10, 20, 30, 40]
    assert reader.keyframes(run_id)[-1].groups == [
        0 if ref or h else None for ref, h in zip(reader.keyframes(run_id)[-1].ref_counts,
                                                 reader.keyframes(run_id)[-1].block_hashes,
                                                 strict=True)]


def test_import_refuses_bad_files(trace_store, tmp_path: Path) -> None:
    run_id, _, _ = record(trace_store, steps=30)
    good = export_run(trace_store, run_id, tmp_path / "good.zip")
    manifest = zipfile.ZipFile(good).read("manifest.json").decode()
    steps_parquet = zipfile.ZipFile(good).read("steps.parquet")
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip at all")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    other_columns = pd.DataFrame({"step": [1]}).to_parquet()
    cases = {
        "no such file": tmp_path / "missing.zip",
        "not a zip": garbage,
        "damaged|not a zip|truncated": truncated,
        "newer than this kvlab": _rewrite(good, tmp_path / "v99.zip", {"manifest.json": manifest
                                          .replace('"format_version": 4', '"format_version": 99')
                                          .encode()}),
        "lacks required columns": _rewrite(good, tmp_path / "cols.zip",
                                           {"steps.parquet": other_columns}),
        "steps.parquet is missing": _rewrite(good, tmp_path / "nosteps.zip",
                                             {"steps.parquet": None}),
        "rows but the manifest": _rewrite(good, tmp_path / "rows.zip", {
            "block_events.parquet": steps_parquet, "steps.parquet": steps_parquet,
            "manifest.json": manifest.replace('"rows": 30', '"rows": 29').encode()}),
        "config is invalid": _rewrite(good, tmp_path / "config.zip", {"manifest.json": manifest
                                      .replace('"model": "tiny"', '"model": "nope"').encode()}),
        "does not match its sha256": _edit_table(good, tmp_path / "sum.zip", "requests"),
    }
    before = RunReader(trace_store).list_runs()
    for message, path in cases.items():
        with pytest.raises(StoreError, match=message):
            import_run(trace_store, path)
    pd.testing.assert_frame_equal(RunReader(trace_store).list_runs(), before)


def test_writer_close_states(trace_store) -> None:
    reader = RunReader(trace_store)
    failed = RunWriter(trace_store, FAKE_CONFIG)
    failed.close(error="RuntimeError('boom')")
    stopped = RunWriter(trace_store, FAKE_CONFIG)
    stopped.close(interrupted=True)
    assert reader.run_info(failed.run_id).status == "failed"
    assert reader.run_info(failed.run_id).error == "RuntimeError('boom')"
    assert reader.run_info(stopped.run_id).status == "interrupted"
    assert reader.list_runs(status="failed").run_id.tolist() == [failed.run_id]
    with pytest.raises(StoreError, match="no run 999"):
        reader.steps(999)
    # A run that ended before its first keyframe is listed, and reads as an empty pool.
    assert reader.block_state_at(failed.run_id, 0).ref_counts == []
    assert reader.steps(failed.run_id).empty


def test_run_row_appears_with_its_first_keyframe(trace_store) -> None:
    """A reader never sees a run it cannot rebuild: the row and keyframe 0 commit together."""
    reader = RunReader(trace_store)
    opened: list[int] = []
    writer = RunWriter(trace_store, FAKE_CONFIG, on_open=opened.append)
    writer.set_device("cpu", "tiny")
    assert writer.run_id is None and reader.list_runs().empty and not opened
    truth = fake_run(writer, 12)
    assert opened == [writer.run_id] == reader.list_runs().run_id.tolist()
    assert reader.run_info(writer.run_id).device == "cpu"
    assert reader.block_state_at(writer.run_id, 0).to_keyframe(0) == truth[0]
    writer.close()
    assert reader.block_state_at(writer.run_id, 12).to_keyframe(12) == truth[12]


def test_write_errors_surface_and_fail_the_run(trace_store) -> None:
    writer = RunWriter(trace_store, FAKE_CONFIG, flush_interval_s=0.01)
    sink = ListSink()
    fake_run(sink, 3)
    writer.record_step(sink.steps[0], [], [])
    writer.record_step(sink.steps[0], [], [])  # the same step twice: the batch cannot commit
    with pytest.raises(StoreError, match="trace writer failed"):
        for _ in range(200):  # the next sink call after the background failure raises
            writer.flush()
    with pytest.raises(StoreError, match="marked failed"):
        writer.close()
    assert RunReader(trace_store).run_info(writer.run_id).status == "failed"
