"""Shared helpers for the store tests: database URLs (SQLite and PostgreSQL) and a fake engine.

`FakeBlockManager` is a second, independent implementation of the block manager's trace rules
(an OrderedDict free queue, explicit eviction), so comparing `RunReader.block_state_at` with its
snapshots tests the store end to end without a model. Test modules import the fixtures by
their function names (`fixture_*`, registered under the names given to `pytest.fixture`). Run
as a script it is the subprocess
writer of the crash and concurrency tests:

    python tests/store_fixtures.py --db URL --steps N [--delay S] [--flush S] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # when run as a script
    sys.path.insert(0, str(ROOT))

from engine.config import RunConfig  # noqa: E402
from engine.trace import (  # noqa: E402
    BlockEvent,
    Keyframe,
    RequestEvent,
    RequestRecord,
    StepRecord,
    TraceSink,
)

PG_ENV = "KVLAB_TEST_PG_URL"
FAKE_CONFIG = RunConfig(model="tiny", num_blocks=48, keyframe_interval=10)


# Database URLs -----------------------------------------------------------------------------
@pytest.fixture(name="make_db_url", params=["sqlite", "postgres"])
def fixture_make_db_url(request: pytest.FixtureRequest,
                        tmp_path: Path) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases of one backend (each call: a new one)."""
    if request.param == "sqlite":
        counter = iter(range(1000))
        yield lambda: f"sqlite:///{tmp_path}/kvlab-{next(counter)}.db"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set (start a server with .ci/postgres.sh)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url as parse

    admin = create_engine(base)
    schemas: list[str] = []

    def fresh() -> str:
        # One schema per database: tests never see each other's runs.
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        schemas.append(schema)
        url = parse(base).update_query_dict({"options": f"-csearch_path={schema}"})
        return url.render_as_string(hide_password=False)

    yield fresh
    with admin.begin() as conn:
        for schema in schemas:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(name="db_url")
def fixture_db_url(make_db_url: Callable[[], str]) -> str:
    return make_db_url()


@pytest.fixture(name="trace_store")
def fixture_trace_store(db_url: str) -> Iterator:
    from store import open_store

    opened = open_store(db_url)
    yield opened
    opened.dispose()


# A fake engine ---------------------------------------------------------------------------
class FakeBlockManager:
    """Block manager rules with an independent implementation; records the events it makes."""

    def __init__(self, num_blocks: int) -> None:
        self.ref = [0] * num_blocks
        self.hashes: list[str | None] = [None] * num_blocks
        self.owners: list[int | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.index: dict[str, int] = {}
        self.events: list[BlockEvent] = []
        self.step = 0
        self.evicted = 0

    def _emit(self, block: int, kind: str, request: int | None) -> None:
        self.events.append(BlockEvent(self.step, block, kind, request, self.ref[block],
                                      self.hashes[block]))

    def allocate(self, request: int) -> int:
        block, _ = self.free.popitem(last=False)
        if self.hashes[block] is not None:  # lazy eviction: the hash goes when reused
            self._emit(block, "evict", None)
            del self.index[self.hashes[block]]
            self.hashes[block] = None
            self.evicted += 1
        self.ref[block], self.owners[block] = 1, request
        self._emit(block, "allocate", request)
        return block

    def touch(self, block: int, request: int) -> None:
        self.free.pop(block, None)
        self.ref[block] += 1
        self.owners[block] = request
        self._emit(block, "touch", request)

    def cache(self, block: int, block_hash: str) -> None:
        self.hashes[block] = block_hash
        self.index[block_hash] = block
        self._emit(block, "cache", None)

    def release(self, block: int, request: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.owners[block] = None
            self.free[block] = None
            if self.hashes[block] is None:  # never matches a prefix: reused first (vLLM 0.33)
                self.free.move_to_end(block, last=False)
                self._emit(block, "free_head", request)
                return
        self._emit(block, "free", request)

    def snapshot(self, step: int) -> Keyframe:
        return Keyframe(step, list(self.ref), list(self.hashes), list(self.owners),
                        list(self.free))


def fake_run(sink: TraceSink, num_steps: int, *, num_blocks: int = 48, seed: int = 0,
             keyframe_interval: int = 10, step_delay_s: float = 0.0) -> list[Keyframe]:
    """Drive `sink` like the engine would; returns the true block state after every step."""
    rng = random.Random(seed)
    bm = FakeBlockManager(num_blocks)
    running: dict[int, list[int]] = {}
    next_id, start = 0, time.monotonic()
    truth = [bm.snapshot(0)]
    sink.record_keyframe(truth[0])
    for step in range(1, num_steps + 1):
        bm.step, bm.events, bm.evicted = step, [], 0
        request_events: list[RequestEvent] = []
        t = time.monotonic() - start
        if len(running) < 6 and rng.random() < 0.5:
            rid, next_id = next_id, next_id + 1
            request_events.append(RequestEvent(step, t, rid, "arrive"))
            running[rid] = _admit(bm, rng, rid)
            request_events.append(RequestEvent(step, t, rid, "schedule"))
        for rid, table in running.items():
            if rng.random() < 0.3 and bm.free:
                table.append(bm.allocate(rid))
                bm.cache(table[-1], f"r{rid}-{len(table)}")
        if running and rng.random() < 0.2:
            rid = rng.choice(sorted(running))
            for block in reversed(running.pop(rid)):  # tail first: evicted first
                bm.release(block, rid)
            request_events.append(RequestEvent(step, t, rid, "finish"))
            sink.record_request(RequestRecord(rid, t / 2, 64, 16, 8, t / 2 + 0.01, t, 0, "stop"))
        sink.record_step(_step_record(bm, step, t, len(running)), bm.events, request_events)
        truth.append(bm.snapshot(step))
        if step % keyframe_interval == 0:
            sink.record_keyframe(truth[-1])
        if step_delay_s:
            time.sleep(step_delay_s)
    return truth


def _admit(bm: FakeBlockManager, rng: random.Random, rid: int) -> list[int]:
    """A prompt of a shared prefix (group chain: prefix hits) plus private blocks."""
    group, table = rng.randrange(3), []
    for i in range(rng.randint(1, 4)):
        block_hash = f"g{group}-{i}"
        if block_hash in bm.index:
            bm.touch(bm.index[block_hash], rid)
            table.append(bm.index[block_hash])
        elif bm.free:
            table.append(bm.allocate(rid))
            bm.cache(table[-1], block_hash)
    for _ in range(rng.randint(1, 3)):
        if bm.free:
            table.append(bm.allocate(rid))
    return table


def _step_record(bm: FakeBlockManager, step: int, t: float, num_running: int) -> StepRecord:
    used = sum(r > 0 for r in bm.ref)
    cached_free = sum(bm.hashes[b] is not None for b in bm.free)
    return StepRecord(
        step=step, t=t, duration_s=0.001 * (step % 7), num_running=num_running,
        num_waiting=step % 3, num_prefill_tokens=16 * (step % 5), num_decode_tokens=num_running,
        num_generated_tokens=num_running, num_preempted=0, blocks_used=used,
        blocks_free=len(bm.free), blocks_cached_free=cached_free, prefix_query_tokens=32,
        prefix_hit_tokens=16 * (step % 3), num_evicted=bm.evicted, kv_bytes_used=used * 4096,
        kv_bytes_capacity=len(bm.ref) * 4096, rss_bytes=100_000_000 + step,
        gpu_utilization_pct=None if step % 2 else 50.5,
    )


def assert_consistent(reader, run_id: int) -> int:
    """Committed steps are 1..L and the block state at L agrees with step L's record."""
    last = reader.last_step(run_id)
    steps = reader.steps(run_id)
    assert steps.step.tolist() == list(range(1, last + 1))
    assert reader.run_info(run_id).num_steps == last
    state = reader.block_state_at(run_id, last)
    assert len(set(state.free_queue)) == len(state.free_queue)
    assert sorted(state.free_queue) == [b for b, ref in enumerate(state.ref_counts) if ref == 0]
    if last:
        record = steps.iloc[-1]
        assert record.blocks_used == sum(ref > 0 for ref in state.ref_counts)
        assert record.blocks_free == len(state.free_queue)
    return last


def assert_events_rebuild_keyframes(reader, run_id: int) -> list[int]:
    """Replayed from the first keyframe alone, the run's events rebuild every later stored
    keyframe (and `block_state_at` agrees); returns the keyframe steps. For traces recorded by
    older kvlab versions, whose rules the current replay must still follow."""
    from engine.trace import BlockEvent, BlockState, apply_block_event

    keyframes = reader.keyframes(run_id)
    events = reader.block_events(run_id)
    assert set(events.group_id) == {0} and "free_head" not in set(events.kind)
    state = BlockState.from_keyframe(keyframes[0])
    previous = keyframes[0].step
    for keyframe in keyframes[1:]:
        for row in events[(events.step > previous) & (events.step <= keyframe.step)].itertuples():
            apply_block_event(state, BlockEvent(row.step, row.block_id, row.kind, row.request_id,
                                                row.ref_count, row.block_hash, row.group_id))
        assert state.to_keyframe(keyframe.step) == keyframe
        assert reader.block_state_at(run_id, keyframe.step) == state
        previous = keyframe.step
    return [k.step for k in keyframes]


def main() -> int:
    from store import RunWriter, open_store

    parser = argparse.ArgumentParser(description="write a fake run into a store")
    parser.add_argument("--db", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name")
    parser.add_argument("--flush", type=float, default=0.25, help="seconds between commits")
    args = parser.parse_args()
    store = open_store(args.db)
    writer = RunWriter(store, FAKE_CONFIG, name=args.name, flush_interval_s=args.flush,
                       on_open=lambda run_id: print(f"run id: {run_id}", flush=True))
    fake_run(writer, args.steps, seed=args.seed, step_delay_s=args.delay)
    writer.close(summary={"steps": args.steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
