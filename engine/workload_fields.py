"""Checks of single workload-file fields, shared by the file formats (engine/workload_formats).

Each takes the parsed JSON object, the key and `where` (file and line) and returns the value or
raises a `WorkloadError` saying what is wrong and what is expected.
"""

from __future__ import annotations

import json
import math
from typing import Any

from engine.workload_request import MAX_ARRIVAL_S, MAX_TOKEN_ID, WorkloadError

ROLES = ("system", "user", "assistant")
FORMS = ('{"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]} '
         '(or {"prompt_token_ids": [...]}), with optional "max_tokens", "arrival" and "id"')
_MESSAGES = '[{"role": "user", "content": "..."}]'


def json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` is never a sensible id or length.
    return isinstance(value, int) and not isinstance(value, bool)


def int_field(data: dict, key: str, where: str, default: int) -> int:
    """An integer >= 1 (lengths)."""
    value = data.get(key, default)
    if not _is_int(value):
        raise WorkloadError(f'{where}: "{key}" is {json_type(value)}; it must be an integer')
    if value < 1:
        raise WorkloadError(f'{where}: "{key}" is {value}; it must be an integer >= 1')
    return value


def label(data: dict, key: str, where: str) -> str | None:
    """A request's own id from the file, as text: "q0" stays "q0", 7 becomes "7"."""
    value = data.get(key)
    if value is None:
        return None
    if _is_int(value):
        return str(value)
    if isinstance(value, str) and value:
        return value
    raise WorkloadError(f'{where}: "{key}" is {json_type(value) if value != "" else "empty"}; '
                        "it must be a non-empty string or an integer")


def arrival(data: dict, where: str) -> float:
    value = data.get("arrival", 0.0)
    expected = f"a number of seconds after the run starts, 0 to {MAX_ARRIVAL_S:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WorkloadError(f'{where}: "arrival" is {json_type(value)}; it must be {expected}')
    try:
        seconds = float(value)
    except OverflowError:  # an integer too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_ARRIVAL_S:
        shown = value if isinstance(value, float) or abs(value) < 10**12 else "huge"
        raise WorkloadError(f'{where}: "arrival" is {shown}; it must be {expected}')
    return seconds


def prompt(data: dict, where: str) -> str | None:
    if "prompt" not in data:
        return None
    value = data["prompt"]
    if not isinstance(value, str) or not value:
        raise WorkloadError(f'{where}: "prompt" must be a non-empty string, e.g. '
                            '{"prompt": "Tell me a story"}')
    return value


def messages(data: dict, where: str, parts: bool = False) -> list[dict[str, str]] | None:
    """A chat. With `parts` (OpenAI bodies) a content may be a list of text parts, and the
    "developer" role is the system role under its newer name."""
    if "messages" not in data:
        return None
    items = data["messages"]
    if not isinstance(items, list) or not items:
        raise WorkloadError(f'{where}: "messages" must be a non-empty array like {_MESSAGES}')
    out = []
    for i, item in enumerate(items, start=1):
        content = item.get("content") if isinstance(item, dict) else None
        if parts and isinstance(content, list):
            content = _text_parts(content, where, i)
        if not isinstance(content, str):
            raise WorkloadError(f'{where}: "messages" item {i} must be an object with a "role" '
                                f'and a string "content", like {_MESSAGES}')
        role = item.get("role")
        if parts and role == "developer":
            role = "system"
        if role not in ROLES:
            shown = json.dumps(role)[:40] if isinstance(role, (str, int, float)) else json_type(
                role)
            raise WorkloadError(f'{where}: "messages" item {i} has role {shown}; roles are '
                                f"{', '.join(ROLES)}")
        out.append({"role": role, "content": content})
    return out


def _text_parts(content: list, where: str, i: int) -> str:
    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
        raise WorkloadError(f'{where}: "messages" item {i} has a content part that is not '
                            '{"type": "text", "text": "..."}; only text is served')
    return "".join(texts)


def token_ids(data: dict, key: str, where: str) -> list[int] | None:
    if key not in data:
        return None
    ids = data[key]
    if (not isinstance(ids, list) or not ids
            or not all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in ids)):
        also = " or a string" if key == "prompt" else ""  # an OpenAI completions body
        raise WorkloadError(f'{where}: "{key}" must be a non-empty array of token ids '
                            f"(integers 0..{MAX_TOKEN_ID}){also}")
    return ids
