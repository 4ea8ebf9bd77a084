"""Workloads: file parsing and its error messages, the synthetic generator, and the presets."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import pytest

from engine.config import WorkloadSpec
from engine.workload import (
    PRESETS,
    SYNTHETIC_TOKEN_RANGE,
    TURN_GAP_S,
    WorkloadError,
    WorkloadRequest,
    build_workload,
    load_workload_file,
    parse_workload_lines,
    synthetic_workload,
)


class FakeTokenizer:
    """One id per character; a chat is its messages joined with role markers."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = False) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "workload.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


# File parsing ---------------------------------------------------------------------------------
def test_file_happy_path_both_forms_and_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "\n".join([
        '{"prompt": "Hi"}',
        "",
        '{"messages": [{"role": "system", "content": "Be brief."}, '
        '{"role": "user", "content": "Why?"}], "max_tokens": 5, "arrival": 1.5}',
        '{"id": 42, "prompt_token_ids": [7, 8, 9], "arrival": 2}',
    ]))
    first, chat, ids = load_workload_file(path)
    assert (first.request_id, first.prompt, first.max_tokens, first.arrival) == (0, "Hi", 64, 0.0)
    assert (chat.request_id, chat.max_tokens, chat.arrival) == (1, 5, 1.5)
    assert chat.messages == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Why?"}]
    # The engine numbers requests in file order; the file's own id is kept as the label.
    assert (ids.request_id, ids.label, ids.prompt_token_ids, ids.arrival) == (2, "42", [7, 8, 9],
                                                                              2.0)
    assert first.label is None

    tok = FakeTokenizer()
    assert first.token_ids(tok) == [ord("H"), ord("i")]
    assert chat.token_ids(tok) == tok.encode("<system>Be brief.<user>Why?<assistant>")
    assert ids.token_ids(tok) == [7, 8, 9]


def test_to_json_line_round_trips() -> None:
    requests = synthetic_workload(WorkloadSpec(kind="synthetic", num_requests=3,
                                               arrival_rate=2.0), seed=1)
    lines = [r.to_json_line() for r in requests]
    assert parse_workload_lines(lines, source="saved") == requests


@pytest.mark.parametrize("bad_line, expected", [
    ('{"prompt": "a", "max_tokens": 3', "invalid JSON"),
    ('["prompt", "a"]', "expected a JSON object, got an array"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}',
     "exactly one of prompt or messages but has prompt and messages"),
    ('{"max_tokens": 4}', "exactly one of prompt or messages but has none"),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"prompt": "a", "max_token": 4}', "unknown key 'max_token'"),
    ('{"prompt": "a", "max_tokens": 0}', '"max_tokens" is 0; it must be an integer >= 1'),
    ('{"prompt": "a", "max_tokens": 2.5}', '"max_tokens" is a number; it must be an integer'),
    ('{"prompt": "a", "arrival": -1}', '"arrival" is -1'),
    ('{"prompt": "a", "arrival": "soon"}', '"arrival" is a string'),
    ('{"prompt": "a", "id": true}', '"id" is a boolean'),
    ('{"messages": []}', '"messages" must be a non-empty array'),
    ('{"messages": [{"role": "bot", "content": "b"}]}',
     '"messages" item 1 has role "bot"; roles are system, user, assistant'),
    ('{"messages": [{"role": "user", "content": "b"}, {"role": "user"}]}',
     '"messages" item 2 must be an object with a "role" and a string "content"'),
    ('{"prompt_token_ids": [1, -2]}', '"prompt_token_ids" must be a non-empty array'),
    ('{"id": 1.5, "prompt": "a"}', '"id" is a number; it must be a non-empty string or an '
                                   "integer"),
    ('{"id": "", "prompt": "a"}', '"id" is empty'),
    ('{"prompt": "a", "arrival": 1e400}', '"arrival" is inf'),
    ('{"prompt": "a", "arrival": 9e9}', "0 to 604800"),
])
def test_bad_line_names_file_line_and_problem(tmp_path: Path, bad_line: str,
                                              expected: str) -> None:
    # The bad request sits on line 3, after a valid line and a blank one.
    path = _write(tmp_path, '{"prompt": "ok"}\n\n' + bad_line + "\n")
    with pytest.raises(WorkloadError) as info:
        load_workload_file(path)
    message = str(info.value)
    assert message.startswith(f"{path} line 3: "), message
    assert expected in message, message


def test_empty_file_and_missing_file_are_reported(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="no requests"):
        load_workload_file(_write(tmp_path, "\n  \n"))
    with pytest.raises(WorkloadError, match="cannot read the workload file"):
        load_workload_file(tmp_path / "missing.jsonl")


def test_parse_lines_names_the_given_source() -> None:
    with pytest.raises(WorkloadError, match=r"^upload\.jsonl line 2: invalid JSON"):
        parse_workload_lines(['{"prompt": "a"}', "{oops"], source="upload.jsonl")


def test_request_needs_exactly_one_prompt_form() -> None:
    with pytest.raises(WorkloadError, match="exactly one of"):
        WorkloadRequest(request_id=0)
    with pytest.raises(WorkloadError, match="exactly one of"):
        WorkloadRequest(request_id=0, prompt="a", prompt_token_ids=[1])


# Synthetic workloads --------------------------------------------------------------------------
def _spec(**numbers: object) -> WorkloadSpec:
    return WorkloadSpec(kind="synthetic", **numbers)  # type: ignore[arg-type]


def test_synthetic_is_deterministic_and_within_bounds() -> None:
    spec = _spec(num_requests=50, arrival_rate=3.0, prompt_len_min=10, prompt_len_max=40,
                 output_len_min=5, output_len_max=9)
    requests = synthetic_workload(spec, seed=11)
    assert requests == synthetic_workload(spec, seed=11)
    assert requests != synthetic_workload(spec, seed=12)
    low, high = SYNTHETIC_TOKEN_RANGE
    for r in requests:
        assert r.prompt_token_ids is not None and r.prompt is None and r.messages is None
        assert 10 <= len(r.prompt_token_ids) <= 40
        assert 5 <= r.max_tokens <= 9
        assert all(low <= t < high for t in r.prompt_token_ids)
    assert [r.request_id for r in requests] == list(range(50))
    arrivals = [r.arrival for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0


def test_rate_zero_means_everything_arrives_at_once() -> None:
    assert {r.arrival for r in synthetic_workload(_spec(num_requests=8), seed=0)} == {0.0}


def test_poisson_inter_arrival_mean_is_one_over_rate() -> None:
    requests = synthetic_workload(_spec(num_requests=2000, arrival_rate=5.0, prompt_len_max=16,
                                        output_len_max=16), seed=3)
    gaps = [b.arrival - a.arrival for a, b in itertools.pairwise(requests)]
    assert statistics.mean(gaps) == pytest.approx(1 / 5.0, rel=0.1)
    # Exponential gaps: the standard deviation equals the mean (a fixed spacing would give 0).
    assert statistics.stdev(gaps) == pytest.approx(1 / 5.0, rel=0.15)


def test_prefix_groups_share_identical_leading_ids() -> None:
    spec = _spec(num_requests=9, num_prefix_groups=3, shared_prefix_len=32, prompt_len_min=8,
                 prompt_len_max=8)
    requests = synthetic_workload(spec, seed=5)
    prefixes = [tuple(r.prompt_token_ids[:32]) for r in requests]  # type: ignore[index]
    groups = [prefixes[i::3] for i in range(3)]  # round-robin: request i joins group i mod 3
    assert all(len(set(g)) == 1 for g in groups)
    assert len({g[0] for g in groups}) == 3  # each group has its own prefix
    assert all(len(r.prompt_token_ids) == 32 + 8 for r in requests)  # type: ignore[arg-type]


def test_multi_turn_turns_extend_the_previous_turn_exactly() -> None:
    spec = _spec(num_requests=3, num_turns=4, arrival_rate=1.0, prompt_len_min=5,
                 prompt_len_max=12, output_len_min=3, output_len_max=7)
    requests = synthetic_workload(spec, seed=9)
    assert len(requests) == 12
    by_len = sorted(requests, key=lambda r: len(r.prompt_token_ids or []))
    first_turns = 0
    for r in by_len:
        ids = r.prompt_token_ids or []
        # The previous turn is the longest shorter prompt that is an exact prefix of this one.
        earlier = [p for p in by_len if len(p.prompt_token_ids or []) < len(ids)
                   and ids[:len(p.prompt_token_ids or [])] == p.prompt_token_ids]
        if not earlier:
            first_turns += 1
            continue
        prev = earlier[-1]
        added = len(ids) - len(prev.prompt_token_ids or [])
        assert prev.max_tokens + 5 <= added <= prev.max_tokens + 12  # reply + new user message
        assert r.arrival == pytest.approx(prev.arrival + TURN_GAP_S)
    assert first_turns == 3


# Presets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_sorted_with_unique_ids(name: str) -> None:
    requests = build_workload(WorkloadSpec(kind="preset", name=name), seed=0)
    assert requests
    assert len({r.request_id for r in requests}) == len(requests)
    assert [r.arrival for r in requests] == sorted(r.arrival for r in requests)
    assert requests == build_workload(WorkloadSpec(kind="preset", name=name), seed=0)
    tok = FakeTokenizer()
    assert all(r.token_ids(tok) for r in requests)


def test_shared_prefix_preset_shares_one_system_prompt() -> None:
    requests = build_workload(WorkloadSpec(name="shared-prefix"), seed=0)
    assert len(requests) == 8 and all(r.max_tokens == 32 for r in requests)
    systems = {r.messages[0]["content"] for r in requests if r.messages}
    assert len(systems) == 1 and len(systems.pop().split()) > 150  # ~256 tokens of text
    assert len({r.messages[-1]["content"] for r in requests if r.messages}) == 8


def test_bundled_prompts_are_valid_chats() -> None:
    requests = build_workload(WorkloadSpec(name="prompts"), seed=0)
    assert len(requests) >= 20 and all(r.max_tokens == 48 for r in requests)
    assert all(r.messages and r.messages[-1]["role"] == "user" for r in requests)


def test_unknown_preset_lists_the_valid_names() -> None:
    with pytest.raises(WorkloadError, match="presets are shared-prefix, prompts, mixed"):
        build_workload(WorkloadSpec(name="nope"), seed=0)


def test_file_spec_loads_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"prompt": "b", "arrival": 2}\n{"prompt": "a", "arrival": 1}\n')
    requests = build_workload(WorkloadSpec(kind="file", path=str(path)), seed=0)
    assert [r.prompt for r in requests] == ["a", "b"]  # ordered by arrival
