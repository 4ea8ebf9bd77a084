"""Workload files in the three forms people have, told apart by their content.

- **JSON lines** (ours): one request object a line, `{"prompt": ...}`, `{"messages": [...]}` or
  `{"prompt_token_ids": [...]}` with optional "max_tokens", "arrival" and "id".
- **OpenAI batch input** (what vLLM's `run_batch` reads): one `{"custom_id", "method", "url",
  "body"}` a line; `body.messages` (chat) or `body.prompt` (text or token ids), and
  `body.max_completion_tokens` or `body.max_tokens` as the output length.
- **ShareGPT** (what vLLM's serving benchmark replays): a JSON array of `{"id",
  "conversations": [{"from", "value"}, ...]}`; the first human turn is the prompt and the number
  of tokens of the answer after it (in the run's tokenizer) the output length.

Detection: a file whose first non-blank character is `[` is ShareGPT; otherwise the first
non-blank line decides: an object with "custom_id" or "body" starts an OpenAI batch file, one
with "conversations" a ShareGPT file written as JSON lines, anything else our JSON lines.

Every problem is a `WorkloadError` naming the file, the line (or array item), what is wrong
and the expected form. The engine numbers requests 0, 1, ... in file order; the file's own ids
become labels, and two requests with one id are refused naming both lines.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.workload_fields import (
    FORMS,
    arrival,
    int_field,
    json_type,
    label,
    messages,
    prompt,
    token_ids,
)
from engine.workload_request import (
    DEFAULT_LIMITS,
    Tokenizer,
    WorkloadError,
    WorkloadLimits,
    WorkloadRequest,
)

FORMAT_NAMES = {"jsonl": "JSON lines", "openai-batch": "OpenAI batch", "sharegpt": "ShareGPT"}
_NATIVE_KEYS = ("id", "prompt", "messages", "prompt_token_ids", "max_tokens", "arrival")
_BATCH_KEYS = ("custom_id", "method", "url", "body")
_BATCH_URLS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}
_BATCH_FORM = ('{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", '
               '"body": {"messages": [...], "max_tokens": N}}')
_HUMAN = ("human", "user")
_NOT_ANSWERS = (*_HUMAN, "system")


@dataclass(slots=True)
class WorkloadFile:
    """A parsed workload file: its requests, the format detected and what was skipped."""

    requests: list[WorkloadRequest]
    format: str  # a FORMAT_NAMES key
    source: str
    skipped: int = 0  # ShareGPT conversations without a human turn followed by an answer

    def describe(self) -> str:
        """'120 requests from FILE (OpenAI batch format)'."""
        text = (f"{len(self.requests):,} requests from {self.source} "
                f"({FORMAT_NAMES[self.format]} format)")
        if self.skipped:
            text += (f"; {self.skipped:,} conversations skipped (no human turn followed by an "
                     "answer)")
        return text


def read_workload_file(path: str | Path, *, tokenizer: Tokenizer | None = None,
                       limits: WorkloadLimits = DEFAULT_LIMITS) -> WorkloadFile:
    """Read and parse a workload file of any of the three formats."""
    path = Path(path)
    try:
        limits.check_bytes(path.stat().st_size, str(path))
        with path.open("rb") as f:
            data = f.read(limits.max_bytes + 1)  # the file may grow after the stat
    except OSError as e:
        raise WorkloadError(f"{path}: cannot read the workload file ({e.strerror})") from e
    return parse_workload_bytes(data, str(path), tokenizer=tokenizer, limits=limits)


def parse_workload_bytes(data: bytes, source: str, *, tokenizer: Tokenizer | None = None,
                         limits: WorkloadLimits = DEFAULT_LIMITS) -> WorkloadFile:
    """Parse a workload's bytes (e.g. an upload); `source` names it in errors."""
    limits.check_bytes(len(data), source)
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is harmless, not an error
    except UnicodeDecodeError:
        raise WorkloadError(f"{source}: not UTF-8 text; a workload is JSON lines or a JSON "
                            "array (ShareGPT)") from None
    return parse_workload_text(text, source, tokenizer=tokenizer, limits=limits)


def parse_workload_text(text: str, source: str, *, tokenizer: Tokenizer | None = None,
                        limits: WorkloadLimits = DEFAULT_LIMITS) -> WorkloadFile:
    if text.lstrip().startswith("["):
        items = _load_json(text, source)
        if not isinstance(items, list):  # "[" then garbage is still not an array
            raise WorkloadError(f"{source}: expected a JSON array of conversations")
        limits.check_requests(len(items), source, "conversations")
        return _sharegpt(((f"{source} item {i}", item) for i, item in enumerate(items, 1)),
                         source, tokenizer)
    lines = text.splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    limits.check_requests(len(numbered), source)
    first = _first_object(numbered)
    if first is not None and ("custom_id" in first or "body" in first):
        return _requests(numbered, source, "openai-batch", _batch_request)
    if first is not None and "conversations" in first:
        items = ((f"{source} line {n}", _line_object(line, f"{source} line {n}", "a ShareGPT "
                  'conversation {"id": ..., "conversations": [...]}'))
                 for n, line in numbered)
        return _sharegpt(items, source, tokenizer)
    return _requests(numbered, source, "jsonl", _native_request)


def parse_workload_lines(lines: Iterable[str], source: str) -> list[WorkloadRequest]:
    """Parse our JSON-lines format only (lines of text); `source` names them in errors."""
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    return _requests(numbered, source, "jsonl", _native_request).requests


# JSON lines: ours and OpenAI batch -------------------------------------------------------------
def _requests(numbered: list[tuple[int, str]], source: str, fmt: str,
              parse: Callable[[dict, str, int], WorkloadRequest]) -> WorkloadFile:
    form = FORMS if fmt == "jsonl" else _BATCH_FORM
    requests: list[WorkloadRequest] = []
    seen = _Ids()
    for line_no, line in numbered:
        where = f"{source} line {line_no}"
        request = parse(_line_object(line, where, form), where, len(requests))
        seen.add(request.label, f"line {line_no}", where)
        requests.append(request)
    if not requests:
        raise WorkloadError(f"{source}: no requests (the file is empty or only blank lines); "
                            f"write one JSON object a line: {FORMS}")
    return WorkloadFile(requests, fmt, source)


def _native_request(data: dict, where: str, index: int) -> WorkloadRequest:
    unknown = sorted(set(data) - set(_NATIVE_KEYS))
    if unknown:
        raise WorkloadError(f"{where}: unknown key {unknown[0]!r}; known keys are "
                            f"{', '.join(_NATIVE_KEYS)}")
    forms = [k for k in ("prompt", "messages", "prompt_token_ids") if k in data]
    if len(forms) != 1:
        problem = "has none" if not forms else f"has {' and '.join(forms)}"
        raise WorkloadError(f"{where}: a request needs exactly one of prompt or messages but "
                            f"{problem}; write {FORMS}")
    return WorkloadRequest(
        request_id=index,
        prompt=prompt(data, where),
        messages=messages(data, where),
        prompt_token_ids=token_ids(data, "prompt_token_ids", where),
        max_tokens=int_field(data, "max_tokens", where, default=64),
        arrival=arrival(data, where),
        label=label(data, "id", where),
    )


def _batch_request(line: dict, where: str, index: int) -> WorkloadRequest:
    unknown = sorted(set(line) - set(_BATCH_KEYS))
    missing = [k for k in _BATCH_KEYS if k not in line]
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        raise WorkloadError(f"{where}: {problem}; an OpenAI batch line is {_BATCH_FORM}")
    if not isinstance(line["custom_id"], str) or not line["custom_id"]:
        raise WorkloadError(f'{where}: "custom_id" must be a non-empty string')
    if line["method"] != "POST":
        raise WorkloadError(f'{where}: "method" is {json.dumps(line["method"])[:40]}; batch '
                            'requests are "POST"')
    url, body = line["url"], line["body"]
    if not isinstance(url, str) or url not in _BATCH_URLS:
        raise WorkloadError(f'{where}: "url" is {json.dumps(url)[:60]}; this lab serves '
                            f"{' and '.join(_BATCH_URLS)}")
    if not isinstance(body, dict):
        raise WorkloadError(f'{where}: "body" is {json_type(body)}; it must be an object')
    needed = _BATCH_URLS[url]
    if needed not in body:
        raise WorkloadError(f'{where}: a {url} body needs "{needed}"')
    body_where = f"{where}: body"
    text = body.get("prompt") if url == "/v1/completions" else None
    length_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return WorkloadRequest(
        request_id=index,
        prompt=prompt(body, body_where) if isinstance(text, str) else None,
        messages=messages(body, body_where, parts=True) if needed == "messages" else None,
        prompt_token_ids=(token_ids(body, "prompt", body_where)
                          if needed == "prompt" and not isinstance(text, str) else None),
        max_tokens=int_field(body, length_key, body_where, default=64),
        label=line["custom_id"],
    )


# ShareGPT --------------------------------------------------------------------------------------
def _sharegpt(items: Iterable[tuple[str, Any]], source: str,
              tokenizer: Tokenizer | None) -> WorkloadFile:
    if tokenizer is None:  # every bundled model uses SmolLM2's tokenizer (models/loader.py)
        from engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    requests: list[WorkloadRequest] = []
    seen = _Ids()
    skipped = 0
    for where, item in items:
        pair = _first_exchange(item, where)
        if pair is None:
            skipped += 1
            continue
        question, answer = pair
        output_len = len(tokenizer.encode(answer))
        if output_len == 0:
            skipped += 1
            continue
        name = label(item, "id", where)
        seen.add(name, where.removeprefix(f"{source} "), where)
        requests.append(WorkloadRequest(len(requests), prompt=question, max_tokens=output_len,
                                        label=name))
    if not requests:
        raise WorkloadError(f"{source}: no usable conversations ({skipped:,} without a human "
                            "turn followed by an answer); a ShareGPT file is "
                            '[{"id": ..., "conversations": [{"from": "human", "value": ...}, '
                            '{"from": "gpt", "value": ...}]}, ...]')
    return WorkloadFile(requests, "sharegpt", source, skipped)


def _first_exchange(item: Any, where: str) -> tuple[str, str] | None:
    """The first human turn and the answer right after it, or None if there is no such pair."""
    expected = '{"id": ..., "conversations": [{"from": "human", "value": "..."}, ...]}'
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise WorkloadError(f"{where}: expected a conversation object like {expected}")
    turns = item["conversations"]
    for i, turn in enumerate(turns, start=1):
        if (not isinstance(turn, dict) or not isinstance(turn.get("from"), str)
                or not isinstance(turn.get("value"), str)):
            raise WorkloadError(f'{where}: turn {i} must be an object with string "from" and '
                                f'"value", like {{"from": "human", "value": "Hi"}}')
    for turn, reply in itertools.pairwise(turns):
        if turn["from"] in _HUMAN:
            if reply["from"] in _NOT_ANSWERS or not turn["value"].strip():
                return None
            return turn["value"], reply["value"]
    return None


# Shared helpers --------------------------------------------------------------------------------
class _Ids:
    """Where each label was first used, to name both places of a duplicate."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}

    def add(self, name: str | None, place: str, where: str) -> None:
        if name is None:
            return
        if name in self.first:
            raise WorkloadError(f"{where}: id {json.dumps(name)[:80]} is already used by "
                                f"{self.first[name]}; ids must be unique")
        self.first[name] = place


def _load_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column "
                            f"{e.colno})") from None
    except RecursionError:
        raise WorkloadError(f"{where}: JSON nested too deeply to be a workload") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise WorkloadError(f"{where}: unreadable JSON ({e})") from None


def _line_object(line: str, where: str, form: str) -> dict:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                            f"each line must be one JSON object: {form}") from None
    except RecursionError:
        raise WorkloadError(f"{where}: JSON nested too deeply; each line must be one JSON "
                            f"object: {form}") from None
    except ValueError as e:
        raise WorkloadError(f"{where}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {json_type(data)}; "
                            f"write {form}")
    return data


def _first_object(numbered: list[tuple[int, str]]) -> dict | None:
    """The first line as an object, if it is one (the format detector's evidence)."""
    if not numbered:
        return None
    try:
        data = json.loads(numbered[0][1])
    except (ValueError, RecursionError):
        return None  # the format's own parser reports the line
    return data if isinstance(data, dict) else None
