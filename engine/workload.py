"""Workloads: the requests a run serves, from a file, a seeded generator or a preset.

A workload is a list of `WorkloadRequest`s (engine/workload_request.py); the engine admits each
at its `arrival` time and tokenizes it with `WorkloadRequest.token_ids`. Files come in three
formats, detected from their content (engine/workload_formats.py); every problem is a
`WorkloadError` naming the file, the line, what is wrong and the expected form, so the CLI
prints it as one line and the dashboard shows it under the upload widget.

Synthetic requests carry `prompt_token_ids` directly rather than text: lengths are then exact
(a text prompt's token count depends on the tokenizer) and no tokenizer is needed to build them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import WorkloadSpec
from engine.workload_fields import ROLES
from engine.workload_formats import (
    FORMAT_NAMES,
    WorkloadFile,
    parse_workload_bytes,
    parse_workload_lines,
    parse_workload_text,
    read_workload_file,
)
from engine.workload_request import (
    DEFAULT_LIMITS,
    Tokenizer,
    WorkloadError,
    WorkloadLimits,
    WorkloadRequest,
)

__all__ = [  # the file side lives in its own modules; callers import it all from here
    "DEFAULT_LIMITS", "FORMAT_NAMES", "PRESETS", "ROLES", "Tokenizer", "WorkloadError",
    "WorkloadFile", "WorkloadLimits", "WorkloadRequest", "build_workload", "by_arrival",
    "load_workload_file",
    "parse_workload_bytes", "parse_workload_lines", "parse_workload_text", "read_workload_file",
    "synthetic_workload",
]

# Synthetic token ids are drawn from here: inside every bundled model's vocabulary (49152) and
# clear of the low ids where byte-level vocabularies keep special and control tokens.
SYNTHETIC_TOKEN_RANGE = (1000, 40000)
# A later turn of a synthetic chat arrives this long after the turn before it: enough for the
# earlier prompt to be prefilled on a CPU, so its blocks are cached when the next turn looks.
TURN_GAP_S = 1.0


def load_workload_file(path: str | Path, *, tokenizer: Tokenizer | None = None,
                       limits: WorkloadLimits = DEFAULT_LIMITS) -> list[WorkloadRequest]:
    """The requests of a workload file in any of the formats of engine.workload_formats."""
    return read_workload_file(path, tokenizer=tokenizer, limits=limits).requests


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


def build_workload(spec: WorkloadSpec, seed: int, *, tokenizer: Tokenizer | None = None,
                   limits: WorkloadLimits = DEFAULT_LIMITS) -> list[WorkloadRequest]:
    """Resolve a spec to requests, ordered by arrival (ties keep their order). `tokenizer`
    counts a ShareGPT file's answers (default: SmolLM2's, which every bundled model uses)."""
    if spec.kind == "file":
        assert spec.path is not None  # WorkloadSpec validation guarantees it
        requests = load_workload_file(spec.path, tokenizer=tokenizer, limits=limits)
    elif spec.kind == "synthetic":
        requests = synthetic_workload(spec, seed)
    elif spec.name in PRESETS:
        requests = PRESETS[spec.name].build(seed)
    else:
        raise WorkloadError(f"unknown workload preset {spec.name!r}; presets are "
                            f"{', '.join(PRESETS)}")
    return by_arrival(requests)


def by_arrival(requests: list[WorkloadRequest]) -> list[WorkloadRequest]:
    return sorted(requests, key=lambda r: r.arrival)  # stable: ties keep file order
