"""Workloads: the requests a run serves, from a JSON-lines file, a seeded generator or a preset.

A workload is a list of `WorkloadRequest`s; the engine admits each at its `arrival` time and
tokenizes it with `WorkloadRequest.token_ids`. File lines are validated one by one and every
problem is a `WorkloadError` naming the file, the line, what is wrong and the expected form, so
the CLI prints it as one line and the dashboard shows it under the upload widget.

Synthetic requests carry `prompt_token_ids` directly rather than text: lengths are then exact
(a text prompt's token count depends on the tokenizer) and no tokenizer is needed to build them.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.config import WorkloadSpec

ROLES = ("system", "user", "assistant")
# Synthetic token ids are drawn from here: inside every bundled model's vocabulary (49152) and
# clear of the low ids where byte-level vocabularies keep special and control tokens.
SYNTHETIC_TOKEN_RANGE = (1000, 40000)
# A later turn of a synthetic chat arrives this long after the turn before it: enough for the
# earlier prompt to be prefilled on a CPU, so its blocks are cached when the next turn looks.
TURN_GAP_S = 1.0

_KNOWN_KEYS = ("id", "prompt", "messages", "prompt_token_ids", "max_tokens", "arrival")
_FORMS = ('{"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]} '
          '(or {"prompt_token_ids": [...]}), with optional "max_tokens", "arrival" and "id"')


class WorkloadError(ValueError):
    """A workload that cannot be served; the message says where, what and the expected form."""


class Tokenizer(Protocol):
    """What the engine's tokenizer must offer a workload (tests pass a small fake)."""

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = ...
    ) -> list[int]: ...


@dataclass(slots=True)
class WorkloadRequest:
    """One request: exactly one of `prompt`, `messages` or `prompt_token_ids` is set."""

    request_id: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None  # pre-tokenized: used as is, no tokenizer needed
    max_tokens: int = 64  # generated tokens at most
    arrival: float = 0.0  # seconds after run start

    def __post_init__(self) -> None:
        given = [self.prompt is not None, self.messages is not None,
                 self.prompt_token_ids is not None]
        if sum(given) != 1:
            raise WorkloadError(f"request {self.request_id}: give exactly one of prompt, "
                                "messages or prompt_token_ids")

    def token_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt as token ids: chats get the template and the assistant's turn opener."""
        if self.prompt_token_ids is not None:
            return list(self.prompt_token_ids)
        if self.messages is not None:
            return list(tokenizer.apply_chat_template(self.messages, add_generation_prompt=True))
        assert self.prompt is not None
        return list(tokenizer.encode(self.prompt))

    def to_json_line(self) -> str:
        """The file form `parse_workload_lines` reads back (a synthetic run can be saved)."""
        data: dict[str, Any] = {"id": self.request_id}
        for key in ("prompt", "messages", "prompt_token_ids"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        data.update(max_tokens=self.max_tokens, arrival=self.arrival)
        return json.dumps(data, ensure_ascii=False)


# File parsing ---------------------------------------------------------------------------------
def load_workload_file(path: str | Path) -> list[WorkloadRequest]:
    """Read a JSON-lines workload: one request object a line, blank lines skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkloadError(f"{path}: cannot read the workload file ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise WorkloadError(f"{path}: not UTF-8 text; a workload is JSON lines") from e
    return parse_workload_lines(text.splitlines(), source=str(path))


def parse_workload_lines(lines: Iterable[str], source: str) -> list[WorkloadRequest]:
    """Parse workload lines (e.g. an uploaded file's text); `source` names them in errors."""
    requests: list[WorkloadRequest] = []
    id_lines: dict[int, int] = {}  # request id -> line number that used it
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {line_no}"
        request = _parse_line(line, where, default_id=len(requests))
        if request.request_id in id_lines:
            raise WorkloadError(f"{where}: id {request.request_id} is already used by line "
                                f"{id_lines[request.request_id]}; ids must be unique")
        id_lines[request.request_id] = line_no
        requests.append(request)
    if not requests:
        raise WorkloadError(f"{source}: no requests (the file is empty or only blank lines); "
                            f"write one JSON object a line: {_FORMS}")
    return requests


def _parse_line(line: str, where: str, default_id: int) -> WorkloadRequest:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                            f"each line must be one JSON object: {_FORMS}") from None
    if not isinstance(data, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {_json_type(data)}; "
                            f"write {_FORMS}")
    unknown = sorted(set(data) - set(_KNOWN_KEYS))
    if unknown:
        raise WorkloadError(f"{where}: unknown key {unknown[0]!r}; known keys are "
                            f"{', '.join(_KNOWN_KEYS)}")
    forms = [k for k in ("prompt", "messages", "prompt_token_ids") if k in data]
    if len(forms) != 1:
        problem = "has none" if not forms else f"has {' and '.join(forms)}"
        raise WorkloadError(f"{where}: a request needs exactly one of prompt or messages but "
                            f"{problem}; write {_FORMS}")
    return WorkloadRequest(
        request_id=_int_field(data, "id", where, default=default_id, minimum=None),
        prompt=_prompt(data, where),
        messages=_messages(data, where),
        prompt_token_ids=_token_ids(data, where),
        max_tokens=_int_field(data, "max_tokens", where, default=64, minimum=1),
        arrival=_arrival(data, where),
    )


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _int_field(data: dict, key: str, where: str, default: int, minimum: int | None) -> int:
    value = data.get(key, default)
    # bool is an int subclass in Python, but `true` is never a sensible id or length.
    if not isinstance(value, int) or isinstance(value, bool):
        raise WorkloadError(f'{where}: "{key}" is {_json_type(value)}; it must be an integer')
    if minimum is not None and value < minimum:
        raise WorkloadError(f'{where}: "{key}" is {value}; it must be an integer >= {minimum}')
    return value


def _arrival(data: dict, where: str) -> float:
    value = data.get("arrival", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WorkloadError(f'{where}: "arrival" is {_json_type(value)}; it must be a number of '
                            "seconds after the run starts, >= 0")
    if not math.isfinite(value) or value < 0:
        raise WorkloadError(f'{where}: "arrival" is {value}; it must be a number of seconds '
                            "after the run starts, >= 0")
    return float(value)


def _prompt(data: dict, where: str) -> str | None:
    if "prompt" not in data:
        return None
    prompt = data["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise WorkloadError(f'{where}: "prompt" must be a non-empty string, e.g. '
                            '{"prompt": "Tell me a story"}')
    return prompt


def _messages(data: dict, where: str) -> list[dict[str, str]] | None:
    if "messages" not in data:
        return None
    messages = data["messages"]
    expected = '[{"role": "user", "content": "..."}]'
    if not isinstance(messages, list) or not messages:
        raise WorkloadError(f'{where}: "messages" must be a non-empty array like {expected}')
    for i, item in enumerate(messages, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise WorkloadError(f'{where}: "messages" item {i} must be an object with a "role" '
                                f'and a string "content", like {expected}')
        if item.get("role") not in ROLES:
            role = json.dumps(item.get("role"))
            raise WorkloadError(f'{where}: "messages" item {i} has role {role}; roles are '
                                f"{', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _token_ids(data: dict, where: str) -> list[int] | None:
    if "prompt_token_ids" not in data:
        return None
    ids = data["prompt_token_ids"]
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        raise WorkloadError(f'{where}: "prompt_token_ids" must be a non-empty array of '
                            "integers >= 0")
    return ids


# Synthetic workloads --------------------------------------------------------------------------
def synthetic_workload(spec: WorkloadSpec, seed: int) -> list[WorkloadRequest]:
    """Seeded requests with exact token lengths; the same spec and seed give the same list.

    `spec.num_requests` conversations start at Poisson arrivals (`arrival_rate` req/s; 0: all
    at t=0, otherwise the first at t=0 and exponential gaps after it). A prompt is
    `prompt_len_min..prompt_len_max` random ids, after the group's shared prefix of
    `shared_prefix_len` ids when `num_prefix_groups > 0` (request i joins group i mod groups).
    With `num_turns > 1` each conversation has that many requests: turn k+1 resends turn k's
    prompt, an assistant reply of turn k's `max_tokens` ids and a new user message, and arrives
    `TURN_GAP_S` after turn k. Requests are ordered by arrival and numbered in that order.
    """
    rng = random.Random(seed)
    prefixes = [_random_ids(rng, spec.shared_prefix_len) for _ in range(spec.num_prefix_groups)]
    drafts: list[tuple[float, list[int], int]] = []  # (arrival, prompt ids, max_tokens)
    start = 0.0
    for i in range(spec.num_requests):
        if i > 0 and spec.arrival_rate > 0:
            start += rng.expovariate(spec.arrival_rate)
        prompt = prefixes[i % len(prefixes)] if prefixes else []
        arrival = start
        for turn in range(spec.num_turns):
            user_len = rng.randint(spec.prompt_len_min, spec.prompt_len_max)
            prompt = prompt + _random_ids(rng, user_len)
            max_tokens = rng.randint(spec.output_len_min, spec.output_len_max)
            drafts.append((arrival, prompt, max_tokens))
            if turn + 1 < spec.num_turns:  # the next turn resends this one and the reply
                prompt = prompt + _random_ids(rng, max_tokens)
                arrival += TURN_GAP_S
    drafts.sort(key=lambda d: d[0])  # stable: ties keep generation order
    return [WorkloadRequest(request_id=i, prompt_token_ids=ids, max_tokens=n, arrival=t)
            for i, (t, ids, n) in enumerate(drafts)]


def _random_ids(rng: random.Random, n: int) -> list[int]:
    low, high = SYNTHETIC_TOKEN_RANGE
    return [rng.randrange(low, high) for _ in range(n)]


# Presets --------------------------------------------------------------------------------------
DATA_DIR = Path(__file__).parent / "data"
PROMPTS_PATH = DATA_DIR / "prompts.jsonl"  # bundled real prompts, see data/README.md


@dataclass(frozen=True, slots=True)
class Preset:
    """A named workload; `spec` is set for synthetic presets so the dashboard can show it."""

    description: str
    build: Callable[[int], list[WorkloadRequest]]  # seed -> requests
    spec: WorkloadSpec | None = None


def _synthetic(description: str, **numbers: Any) -> Preset:
    spec = WorkloadSpec(kind="synthetic", **numbers)
    return Preset(description, lambda seed: synthetic_workload(spec, seed), spec)


def bundled_prompts(max_tokens: int = 48) -> list[WorkloadRequest]:
    """The bundled real prompts as chat requests, all arriving at t=0."""
    requests = load_workload_file(PROMPTS_PATH)
    for r in requests:
        r.max_tokens = max_tokens
    return requests


def _shared_prefix_demo(seed: int) -> list[WorkloadRequest]:
    # One long system prompt before eight different questions. The first request arrives alone
    # so its prefill caches the system prompt's blocks; the rest arrive just after and hit them.
    text = (DATA_DIR / "shared_system_prompt.txt").read_text(encoding="utf-8")
    system = "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))  # unwrap lines
    questions = [r.messages[-1] for r in bundled_prompts() if r.messages and len(r.messages) == 1]
    return [WorkloadRequest(request_id=i, max_tokens=32, arrival=0.25 * i,
                            messages=[{"role": "system", "content": system}, question])
            for i, question in enumerate(questions[:8])]


def _demo_waves(seed: int) -> list[WorkloadRequest]:
    # The home page's demo, sized with its config (ui/session.demo_config: 36 blocks of 16
    # tokens, six requests running at most, EOS ignored so every machine makes the same steps).
    # Three chats share the system prompt (ref counts above 1), two without it push the cache
    # past its size (LRU eviction of cached free blocks, a preemption and its recompute), then
    # three more with the system prompt re-hit the blocks that survived. The first request
    # arrives alone so that its prefill caches the system prompt before anyone looks it up.
    text = (DATA_DIR / "shared_system_prompt.txt").read_text(encoding="utf-8")
    system = "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))
    questions = iter(r.messages[-1] for r in bundled_prompts()
                     if r.messages and len(r.messages) == 1)
    requests: list[WorkloadRequest] = []
    for count, shared in DEMO_WAVES:
        for _ in range(count):
            question = next(questions)
            messages = [{"role": "system", "content": system}, question] if shared else [question]
            requests.append(WorkloadRequest(request_id=len(requests), messages=messages,
                                            max_tokens=8, arrival=0.05 if requests else 0.0))
    return requests


DEMO_WAVES = ((3, True), (2, False), (3, True))  # (chats, with the shared system prompt)


PRESETS: dict[str, Preset] = {
    "shared-prefix": Preset("8 chat requests sharing a ~256-token system prompt; 32 tokens "
                            "out each (the prefix-caching demo)", _shared_prefix_demo),
    "prompts": Preset("the 24 bundled real prompts as chat requests, 48 tokens out each",
                      lambda seed: bundled_prompts()),
    "mixed": _synthetic("16 synthetic requests, Poisson arrivals at 4 req/s, prompts 32-256 "
                        "tokens after one of 2 shared 128-token prefixes, outputs 16-128",
                        num_requests=16, arrival_rate=4.0, prompt_len_min=32,
                        prompt_len_max=256, output_len_min=16, output_len_max=128,
                        num_prefix_groups=2, shared_prefix_len=128),
    "chat": _synthetic("4 synthetic conversations x 3 turns; each turn resends the earlier ones",
                       num_requests=4, num_turns=3, arrival_rate=1.0, prompt_len_min=32,
                       prompt_len_max=96, output_len_min=16, output_len_max=48),
    "long": _synthetic("64 synthetic requests, ~256 tokens out each, 2 req/s, 4 shared "
                       "prefixes: crash tests and trace benchmarks (minutes on a CPU)",
                       num_requests=64, arrival_rate=2.0, prompt_len_min=64,
                       prompt_len_max=512, output_len_min=192, output_len_max=320,
                       num_prefix_groups=4, shared_prefix_len=128),
    "demo": Preset("8 chats in three waves (3 with the shared system prompt, 2 without, 3 "
                   "with it again), 8 tokens out each: in a small cache they show prefix "
                   "sharing, LRU eviction, a preemption and re-hits (the home page's demo)",
                   _demo_waves),
}


def build_workload(spec: WorkloadSpec, seed: int) -> list[WorkloadRequest]:
    """Resolve a spec to requests, ordered by arrival (ties keep their order)."""
    if spec.kind == "file":
        assert spec.path is not None  # WorkloadSpec validation guarantees it
        requests = load_workload_file(spec.path)
    elif spec.kind == "synthetic":
        requests = synthetic_workload(spec, seed)
    elif spec.name in PRESETS:
        requests = PRESETS[spec.name].build(seed)
    else:
        raise WorkloadError(f"unknown workload preset {spec.name!r}; presets are "
                            f"{', '.join(PRESETS)}")
    return sorted(requests, key=lambda r: r.arrival)
