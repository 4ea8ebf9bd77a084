"""Bad input, counted: hypothesis throws random and mutated workload files (all three formats)
and trace files at the parser and the importer.

Every case must end in a parsed workload / an imported run, or in the one-line error the README
promises (`WorkloadError`, `StoreError`): never another exception, never a hang (a watchdog
fails a case after CASE_TIMEOUT_S), and a refused import leaves every table's row count as it
was. The number of cases tried is printed at the end of the pytest run (tests/conftest.py).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import signal
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from store_fixtures import (  # noqa: F401 (fixtures)
    FAKE_CONFIG,
    fake_run,
    fixture_db_url,
    fixture_make_db_url,
)
from test_workload import FakeTokenizer

from engine.workload import (
    WorkloadError,
    WorkloadLimits,
    parse_workload_bytes,
    parse_workload_text,
)
from store import RunWriter, StoreError, delete_run, export_run, import_run, open_store
from store.models import Base

CASE_TIMEOUT_S = 20
LIMITS = WorkloadLimits(max_requests=40, max_bytes=64 * 1024)
MAX_TRACE_BYTES = 4 * 1024**2  # the importer's unpack cap in these tests (a zip bomb exceeds it)
FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@contextmanager
def watchdog(seconds: int = CASE_TIMEOUT_S) -> Iterator[None]:
    """Fail a case that runs longer than `seconds` instead of hanging the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"a fuzz case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# Random JSON, including what JSON parsers accept but workloads must not -----------------------
ODD_NUMBERS = st.sampled_from([0, -1, 2**31, 2**63, 10**40, -(10**40), 1e308, 1e-308,
                               float("nan"), float("inf"), float("-inf"), 0.5, True, False])
KEYS = st.sampled_from(["id", "prompt", "messages", "prompt_token_ids", "max_tokens", "arrival",
                        "custom_id", "method", "url", "body", "max_completion_tokens", "role",
                        "content", "conversations", "from", "value", "type", "text"])
SCALARS = (st.none() | st.booleans() | st.integers() | ODD_NUMBERS | st.floats()
           | st.text(max_size=12) | st.sampled_from(["POST", "/v1/completions", "human", "gpt",
                                                     "user", "system", "", "..", "NaN"]))
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(KEYS | st.text(max_size=6), inner, max_size=4), max_leaves=12)


def _batch(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


VALID = {
    "jsonl": [{"id": "q0", "prompt": "Hi", "max_tokens": 4, "arrival": 0.5},
              {"messages": [{"role": "system", "content": "Be brief"},
                            {"role": "user", "content": "Why?"}]},
              {"id": 3, "prompt_token_ids": [5, 6, 7], "max_tokens": 2}],
    "openai-batch": [_batch("r1", {"messages": [{"role": "user", "content": "x"}],
                                   "max_tokens": 3}),
                     _batch("r2", {"prompt": "Once", "max_completion_tokens": 5},
                            "/v1/completions"),
                     _batch("r3", {"prompt": [9, 8, 7]}, "/v1/completions")],
    "sharegpt": [{"id": "c1", "conversations": [{"from": "human", "value": "q?"},
                                                {"from": "gpt", "value": "an answer"}]},
                 {"id": "c2", "conversations": [{"from": "system", "value": "s"},
                                                {"from": "human", "value": "more"},
                                                {"from": "gpt", "value": "yes"}]}],
}


def mutate(data: st.DataObject, value: Any, depth: int = 0) -> Any:
    """`value` with one node replaced by random JSON, or a key dropped or added."""
    if isinstance(value, (dict, list)) and value and depth < 6 and data.draw(st.booleans()):
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        key = data.draw(st.sampled_from(keys))
        copy = dict(value) if isinstance(value, dict) else list(value)
        copy[key] = mutate(data, value[key], depth + 1)
        return copy
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "drop" and isinstance(value, dict) and value:
        key = data.draw(st.sampled_from(list(value)))
        return {k: v for k, v in value.items() if k != key}
    if action == "add" and isinstance(value, dict):
        return {**value, data.draw(KEYS): data.draw(JSON_VALUES)}
    return data.draw(JSON_VALUES)


def mutate_text(data: st.DataObject, text: str) -> str:
    """Character-level damage: cut, insert, duplicate or swap lines."""
    action = data.draw(st.sampled_from(["cut", "insert", "duplicate", "swap", "none"]))
    if action == "cut":
        return text[:data.draw(st.integers(0, len(text)))]
    if action == "insert":
        at = data.draw(st.integers(0, len(text)))
        return text[:at] + data.draw(st.text(min_size=1, max_size=4)) + text[at:]
    lines = text.splitlines()
    if action == "duplicate" and lines:
        return "\n".join([*lines, data.draw(st.sampled_from(lines))])
    if action == "swap" and len(lines) > 1:
        return "\n".join(lines[1:] + lines[:1])
    return text


def check_workload(counts: collections.Counter, text: str | bytes, how: str) -> None:
    """One case: a valid workload or a one-line WorkloadError naming the source."""
    counts["workload parser"] += 1
    counts[f"workload parser: {how}"] += 1
    with watchdog():
        try:
            if isinstance(text, bytes):
                loaded = parse_workload_bytes(text, "fuzz", tokenizer=FakeTokenizer(),
                                              limits=LIMITS)
            else:
                loaded = parse_workload_text(text, "fuzz", tokenizer=FakeTokenizer(),
                                             limits=LIMITS)
        except WorkloadError as e:
            message = str(e)
            assert message.startswith("fuzz") and "\n" not in message, message
            counts["workload parser refused"] += 1
            return
    counts["workload parser accepted"] += 1
    requests = loaded.requests
    assert [r.request_id for r in requests] == list(range(len(requests)))
    labels = [r.label for r in requests if r.label is not None]
    assert len(labels) == len(set(labels))
    for r in requests:
        assert isinstance(r.max_tokens, int) and r.max_tokens >= 1
        assert 0 <= r.arrival <= 7 * 24 * 3600
        assert r.token_ids(FakeTokenizer()) or r.prompt_token_ids is None


def _dump(fmt: str, items: list[Any]) -> str:
    if fmt == "sharegpt" and items and isinstance(items, list):
        return json.dumps(items)
    return "\n".join(json.dumps(item) for item in items)


@settings(FUZZ, max_examples=300)
@given(data=st.data(), fmt=st.sampled_from(list(VALID)))
def test_mutated_workload_files(fuzz_counts, data, fmt):
    items = data.draw(st.lists(st.sampled_from(VALID[fmt]), min_size=1, max_size=4))
    items = [mutate(data, item) if data.draw(st.booleans()) else item for item in items]
    text = mutate_text(data, _dump(fmt, items))
    check_workload(fuzz_counts, text, f"mutated {fmt}")


@settings(FUZZ, max_examples=150)
@given(lines=st.lists(JSON_VALUES.map(json.dumps) | st.text(max_size=40), max_size=6))
def test_random_workload_lines(fuzz_counts, lines):
    check_workload(fuzz_counts, "\n".join(lines), "random lines")


@settings(FUZZ, max_examples=60)
@given(blob=st.binary(max_size=200))
def test_random_workload_bytes(fuzz_counts, blob):
    check_workload(fuzz_counts, blob, "random bytes")


@pytest.mark.parametrize("text", [
    "[" * 50_000, "{" * 50_000, '{"prompt": ' + "[" * 50_000,
    '{"prompt": "a", "max_tokens": ' + "9" * 5000 + "}",  # past Python's int-digit limit
    '{"prompt": "a", "arrival": NaN}', '{"prompt": "a", "arrival": -Infinity}',
    '{"prompt_token_ids": [1e999]}', '{"prompt_token_ids": [' + "7," * 30_000 + "7]}",
    "\n".join(['{"prompt": "x"}'] * 41),  # one past LIMITS.max_requests
    '{"prompt": "' + "x" * 70_000 + '"}',  # past LIMITS.max_bytes
    '[{"conversations": ' + "[" * 5000 + "]}]",
])
def test_pathological_workloads(fuzz_counts, text):
    check_workload(fuzz_counts, text, "pathological")


def test_a_refused_workload_writes_nothing(fuzz_counts, tmp_path):
    import cli

    url = f"sqlite:///{tmp_path / 'kvlab.db'}"
    store = open_store(url)
    before = row_counts(store)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "arrival": NaN}\n')
    fuzz_counts.update(["workload parser", "workload parser refused",
                        "workload parser: through the CLI"])
    assert cli.main(["run", "--model", "tiny", "--workload", str(bad), "--db", url]) == 2
    assert row_counts(store) == before
    store.dispose()


# Trace files ----------------------------------------------------------------------------------
def row_counts(store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in Base.metadata.sorted_tables}


@pytest.fixture(scope="module")
def good_trace(tmp_path_factory) -> dict[str, bytes]:
    """The members of a valid exported trace (a 30-step fake run)."""
    folder = tmp_path_factory.mktemp("good")
    store = open_store(f"sqlite:///{folder / 'kvlab.db'}")
    writer = RunWriter(store, FAKE_CONFIG, name="fuzz seed")
    fake_run(writer, 30)
    writer.close()
    path = export_run(store, writer.run_id, folder / "good.kvtrace.zip")
    store.dispose()
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def pack(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


class Importer:
    """Imports files into one store and checks the outcome of each case."""

    def __init__(self, store, folder: Path, counts: collections.Counter) -> None:
        self.store, self.folder, self.counts = store, folder, counts

    def check(self, blob: bytes, how: str) -> None:
        self.counts["trace importer"] += 1
        self.counts[f"trace importer: {how}"] += 1
        path = self.folder / "case.kvtrace.zip"
        path.write_bytes(blob)
        before = row_counts(self.store)
        with watchdog():
            try:
                run_id = import_run(self.store, path, max_bytes=MAX_TRACE_BYTES)
            except StoreError as e:
                message = str(e)
                assert "\n" not in message and len(message) < 600, message
                assert row_counts(self.store) == before, message
                self.counts["trace importer refused"] += 1
                return
        self.counts["trace importer accepted"] += 1
        delete_run(self.store, run_id)  # a harmless mutation imports; the next case starts clean
        assert row_counts(self.store) == before


@pytest.fixture
def importer(db_url, tmp_path, fuzz_counts) -> Iterator[Importer]:
    store = open_store(db_url)
    yield Importer(store, tmp_path, fuzz_counts)
    store.dispose()


def _manifest(members: dict[str, bytes]) -> dict:
    return json.loads(members["manifest.json"])


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_mutated_manifests(importer, good_trace, data):
    manifest = mutate(data, _manifest(good_trace))
    members = {**good_trace, "manifest.json": json.dumps(manifest).encode()}
    importer.check(pack(members), "mutated manifest")


@settings(FUZZ, max_examples=60)
@given(data=st.data(), table=st.sampled_from(["steps", "block_events", "request_events",
                                               "requests", "keyframes"]),
       checksum=st.sampled_from(["kept (now a lie)", "recomputed", "removed"]))
def test_damaged_tables(importer, good_trace, data, table, checksum):
    original = good_trace[f"{table}.parquet"]
    kind = data.draw(st.sampled_from(["truncated", "flipped", "other table", "random columns"]))
    if kind == "truncated":
        damaged = original[:data.draw(st.integers(0, len(original) - 1))]
    elif kind == "flipped":
        at = data.draw(st.integers(0, len(original) - 1))
        damaged = original[:at] + bytes([original[at] ^ 0xFF]) + original[at + 1:]
    elif kind == "other table":
        damaged = good_trace[data.draw(st.sampled_from(
            [n for n in good_trace if n.endswith(".parquet")]))]
    else:
        columns = data.draw(st.dictionaries(KEYS | st.sampled_from(["step", "kind", "t"]),
                                            st.lists(st.integers(-2**63, 2**63 - 1)
                                                     | st.none(), min_size=3, max_size=3),
                                            min_size=1, max_size=3))
        buffer = io.BytesIO()
        pq.write_table(pa.table(columns), buffer)
        damaged = buffer.getvalue()
    manifest = _manifest(good_trace)
    entry = manifest["tables"][table]
    if checksum == "recomputed":
        entry["sha256"] = hashlib.sha256(damaged).hexdigest()
    elif checksum == "removed":  # a file from before checksums: the parser sees the damage
        entry.pop("sha256")
    members = {**good_trace, f"{table}.parquet": damaged,
               "manifest.json": json.dumps(manifest).encode()}
    importer.check(pack(members), f"damaged table, checksum {checksum}")


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_damaged_archives(importer, good_trace, data):
    blob = bytearray(pack(good_trace))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    importer.check(bytes(blob), "damaged archive bytes")


def test_hostile_archives(importer, good_trace):
    manifest = _manifest(good_trace)
    lying_rows = json.loads(json.dumps(manifest))
    lying_rows["tables"]["steps"]["rows"] += 1
    lying_sum = json.loads(json.dumps(manifest))
    lying_sum["tables"]["requests"]["sha256"] = "0" * 64
    bomb = {**good_trace, "padding.bin": b"\0" * (MAX_TRACE_BYTES + 1)}  # deflates to ~4 KiB
    cases = {
        "../ entry": {**good_trace, "../evil.parquet": b"x"},
        "absolute entry": {**good_trace, "/etc/evil": b"x"},
        "nested ../ entry": {**good_trace, "a/../../evil": b"x"},
        "rows that lie": {**good_trace, "manifest.json": json.dumps(lying_rows).encode()},
        "checksum that lies": {**good_trace, "manifest.json": json.dumps(lying_sum).encode()},
        "deep manifest": {**good_trace, "manifest.json": b"[" * 100_000},
        "no manifest": {k: v for k, v in good_trace.items() if k != "manifest.json"},
    }
    for how, members in cases.items():
        importer.check(pack(members), how)
    compressed = pack(bomb, zipfile.ZIP_DEFLATED)
    assert len(compressed) < 64 * 1024  # small on disk, past the cap when inflated
    importer.check(compressed, "zip bomb")
    with pytest.raises(StoreError, match="unpacks to more than 4,194,304 bytes"):
        path = importer.folder / "bomb.zip"
        path.write_bytes(compressed)
        import_run(importer.store, path, max_bytes=MAX_TRACE_BYTES)
    importer.check(pack(good_trace), "unchanged (control)")
    assert importer.counts["trace importer accepted"] >= 1
