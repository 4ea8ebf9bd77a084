"""Workload files as people write them: string ids as labels, OpenAI batch input files, ShareGPT
conversations, format detection from the content, and the size limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_workload import FakeTokenizer

from engine.workload import (
    WorkloadError,
    WorkloadLimits,
    load_workload_file,
    parse_workload_bytes,
    read_workload_file,
)


def _write(tmp_path: Path, lines: list[object] | str, name: str = "w.txt") -> Path:
    path = tmp_path / name
    text = lines if isinstance(lines, str) else "\n".join(
        line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


# Our JSON lines: ids become labels ------------------------------------------------------------
def test_string_and_integer_ids_become_labels_and_the_engine_numbers_requests(tmp_path):
    path = _write(tmp_path, ['{"id": "q0", "prompt": "a"}', '{"prompt": "b"}',
                             '{"id": 7, "prompt": "c"}'])
    loaded = read_workload_file(path)
    assert loaded.format == "jsonl"
    assert [(r.request_id, r.label) for r in loaded.requests] == [(0, "q0"), (1, None), (2, "7")]
    assert loaded.describe() == f"3 requests from {path} (JSON lines format)"


@pytest.mark.parametrize("first, again", [('"q0"', '"q0"'), ("3", '"3"')])
def test_duplicate_ids_name_both_lines(tmp_path, first, again):
    path = _write(tmp_path, [f'{{"id": {first}, "prompt": "a"}}', '{"prompt": "b"}', "",
                             f'{{"id": {again}, "prompt": "c"}}'])
    with pytest.raises(WorkloadError, match=r"line 4: id \"\w+\" is already used by line 1; "
                                            "ids must be unique"):
        load_workload_file(path)


# OpenAI batch input ---------------------------------------------------------------------------
def _batch(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_openai_batch_file_chat_text_and_token_prompts(tmp_path):
    chat = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                         {"type": "text", "text": "there"}]}]
    path = _write(tmp_path, [
        _batch("request-1", {"model": "x", "messages": chat, "max_tokens": 5,
                             "temperature": 0.3}),
        _batch("request-2", {"prompt": "Once", "max_completion_tokens": 9, "max_tokens": 2},
               url="/v1/completions"),
        _batch("request-3", {"prompt": [11, 12, 13]}, url="/v1/completions"),
    ], name="batch.jsonl")
    loaded = read_workload_file(path)
    assert loaded.format == "openai-batch"
    assert loaded.describe() == f"3 requests from {path} (OpenAI batch format)"
    one, two, three = loaded.requests
    assert (one.request_id, one.label, one.max_tokens) == (0, "request-1", 5)
    assert one.messages == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi there"}]
    assert (two.label, two.prompt, two.max_tokens) == ("request-2", "Once", 9)
    assert (three.prompt_token_ids, three.max_tokens) == ([11, 12, 13], 64)
    assert all(r.arrival == 0.0 for r in loaded.requests)


@pytest.mark.parametrize("line, expected", [
    (_batch("a", {"messages": [{"role": "user", "content": "x"}]}) | {"extra": 1},
     "unknown key 'extra'; an OpenAI batch line is"),
    ({"custom_id": "a", "method": "POST", "body": {}}, "no 'url'"),
    (_batch("", {"messages": []}), '"custom_id" must be a non-empty string'),
    (_batch("a", {"messages": []}) | {"method": "GET"}, '"method" is "GET"; batch requests are'),
    (_batch("a", {}, url="/v1/embeddings"), '"url" is "/v1/embeddings"; this lab serves'),
    (_batch("a", {"prompt": "x"}), 'a /v1/chat/completions body needs "messages"'),
    (_batch("a", [1]), '"body" is an array; it must be an object'),
    (_batch("a", {"prompt": ["x", "y"]}, url="/v1/completions"),
     'body: "prompt" must be a non-empty array of token ids'),
    (_batch("a", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
     "only text is served"),
    (_batch("a", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
     'body: "max_tokens" is 0'),
    (_batch("b", {"messages": [{"role": "user", "content": "x"}]}),
     'id "b" is already used by line 1'),
])
def test_bad_openai_batch_lines_are_named(tmp_path, line, expected):
    first = _batch("b", {"messages": [{"role": "user", "content": "fine"}]})
    path = _write(tmp_path, [first, line])
    with pytest.raises(WorkloadError) as info:
        load_workload_file(path)
    assert str(info.value).startswith(f"{path} line 2: "), str(info.value)
    assert expected in str(info.value)


# ShareGPT -------------------------------------------------------------------------------------
def _conversation(cid: object, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


SHAREGPT = [
    _conversation("a1", ("system", "be nice"), ("human", "Hello?"), ("gpt", "Hi!"),
                  ("human", "more"), ("gpt", "a much longer second answer")),
    _conversation("a2", ("gpt", "an answer first"), ("human", "question"), ("bard", "four")),
    _conversation("a3", ("human", "alone")),  # no answer: skipped
    _conversation("a4", ("human", "q"), ("human", "q again"), ("gpt", "late")),  # no answer next
    _conversation("a5"),
    _conversation("a6", ("human", "q"), ("gpt", "")),  # an empty answer is no answer
]


def test_sharegpt_first_human_turn_and_its_answer(tmp_path):
    path = _write(tmp_path, json.dumps(SHAREGPT, indent=2), name="sg.json")
    loaded = read_workload_file(path, tokenizer=FakeTokenizer())
    assert loaded.format == "sharegpt" and loaded.skipped == 4
    assert [(r.request_id, r.label, r.prompt, r.max_tokens) for r in loaded.requests] == [
        (0, "a1", "Hello?", len("Hi!")), (1, "a2", "question", len("four"))]
    assert loaded.describe() == (f"2 requests from {path} (ShareGPT format); 4 conversations "
                                 "skipped (no human turn followed by an answer)")


def test_sharegpt_counts_answers_with_the_real_tokenizer(tmp_path, tokenizer):
    answer = "The KV cache keeps keys and values of earlier tokens."
    path = _write(tmp_path, json.dumps([_conversation(1, ("human", "q"), ("gpt", answer))]))
    (request,) = load_workload_file(path)  # the default tokenizer is SmolLM2's
    assert request.max_tokens == len(tokenizer.encode(answer)) and request.label == "1"


def test_sharegpt_as_json_lines_is_detected_too(tmp_path):
    path = _write(tmp_path, [SHAREGPT[0], SHAREGPT[2]])
    loaded = read_workload_file(path, tokenizer=FakeTokenizer())
    assert (loaded.format, len(loaded.requests), loaded.skipped) == ("sharegpt", 1, 1)


@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "item 1: expected a conversation object"),
    ('[{"conversations": [{"from": "human"}]}]', 'item 1: turn 1 must be an object with string'),
    ("[" + json.dumps(SHAREGPT[2]) + "]", r"no usable conversations \(1 without a human turn"),
    ('[{"id": "x", "conversations": []}, {"id": "x", "conversations": []}]', "no usable"),
    ("[" + json.dumps(SHAREGPT[0]) + ", " + json.dumps(SHAREGPT[0]) + "]",
     'item 2: id "a1" is already used by item 1'),
    ('[{"id": 1, "conversations": [], ', "invalid JSON"),
    ("[" * 100_000, "invalid JSON|nested too deeply"),
])
def test_bad_sharegpt_files_are_named(tmp_path, content, expected):
    path = _write(tmp_path, content)
    with pytest.raises(WorkloadError, match=expected):
        load_workload_file(path, tokenizer=FakeTokenizer())


# Detection and limits -------------------------------------------------------------------------
def test_detection_ignores_the_file_name(tmp_path):
    batch = _batch("x", {"messages": [{"role": "user", "content": "q"}]})
    assert read_workload_file(_write(tmp_path, [batch], name="a.json")).format == "openai-batch"
    sharegpt = json.dumps(SHAREGPT[:1])
    assert read_workload_file(_write(tmp_path, sharegpt, name="b.jsonl"),
                              tokenizer=FakeTokenizer()).format == "sharegpt"


def test_request_and_byte_limits_are_stated(tmp_path):
    path = _write(tmp_path, ['{"prompt": "a"}'] * 12)
    with pytest.raises(WorkloadError, match=rf"^{path} has 12 requests; the limit is 10 \(raise "
                                            r"it with --max-requests\)"):
        load_workload_file(path, limits=WorkloadLimits(max_requests=10))
    big = WorkloadLimits(max_requests=1_000_000, max_bytes=100)
    with pytest.raises(WorkloadError, match=r"is 191 bytes; the limit is 100 .* --max-workload"):
        load_workload_file(path, limits=big)
    many = json.dumps([SHAREGPT[0]] * 3)
    with pytest.raises(WorkloadError, match="has 3 conversations; the limit is 2"):
        parse_workload_bytes(many.encode(), "up.json", limits=WorkloadLimits(max_requests=2))
    assert len(load_workload_file(path, limits=WorkloadLimits(max_requests=12))) == 12


def test_limits_state_thousands_with_separators():
    limits = WorkloadLimits(max_requests=100_000)
    with pytest.raises(WorkloadError, match=r"FILE has 1,000,001 requests; the limit is 100,000"):
        limits.check_requests(1_000_001, "FILE")
    with pytest.raises(WorkloadError, match=r"268,435,456 \(256 MiB\)"):
        WorkloadLimits().check_bytes(300_000_000, "FILE")


def test_bytes_that_are_not_utf8_are_refused():
    with pytest.raises(WorkloadError, match="not UTF-8 text"):
        parse_workload_bytes(b'{"prompt": "\xff"}', "up.jsonl")
    assert parse_workload_bytes('\ufeff{"prompt": "a"}'.encode(), "bom.jsonl").requests
