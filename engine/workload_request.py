"""One request of a workload, the error a bad workload raises, and the bounds on a workload file.

Kept apart from the file formats (engine/workload_formats.py) and the generators
(engine/workload.py) so both can import it without importing each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

# A request arriving later than this is almost surely a unit mistake (milliseconds for
# seconds), and the run would sit idle until then: refuse it instead of hanging.
MAX_ARRIVAL_S = 7 * 24 * 3600.0
# Token ids past this fit no vocabulary and no int32 index tensor.
MAX_TOKEN_ID = 2**31 - 1


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
    """One request: exactly one of `prompt`, `messages` or `prompt_token_ids` is set.

    `request_id` is the engine's number for it (its position in the workload); `label` is the
    id the workload file gave it ("q0", a batch file's custom_id), shown beside the number.
    """

    request_id: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None  # pre-tokenized: used as is, no tokenizer needed
    max_tokens: int = 64  # generated tokens at most
    arrival: float = 0.0  # seconds after run start
    label: str | None = None  # the file's own id for the request, as text

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
        """The JSON-lines form the file parser reads back (a synthetic run can be saved)."""
        data: dict[str, Any] = {} if self.label is None else {"id": self.label}
        for key in ("prompt", "messages", "prompt_token_ids"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        data.update(max_tokens=self.max_tokens, arrival=self.arrival)
        return json.dumps(data, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class WorkloadLimits:
    """How much one workload file may hold. The CLI raises them with --max-requests and
    --max-workload-bytes; the dashboard's upload uses the defaults."""

    max_requests: int = 100_000
    max_bytes: int = 256 * 1024**2

    def check_bytes(self, size: int, source: str) -> None:
        if size > self.max_bytes:
            raise WorkloadError(f"{source} is {size:,} bytes; the limit is {self.max_bytes:,} "
                                f"({_mib(self.max_bytes)}) (raise it with --max-workload-bytes)")

    def check_requests(self, count: int, source: str, what: str = "requests") -> None:
        if count > self.max_requests:
            raise WorkloadError(f"{source} has {count:,} {what}; the limit is "
                                f"{self.max_requests:,} (raise it with --max-requests)")


DEFAULT_LIMITS = WorkloadLimits()


def _mib(n: int) -> str:
    return f"{n / 1024**2:g} MiB"
