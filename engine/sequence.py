"""Request state as the scheduler, block manager and model runner see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not yet scheduled, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One request. `token_ids` holds the prompt followed by every generated token.

    `num_computed_tokens` counts tokens whose K/V are in the cache (including prefix-cache hits);
    the model runner computes `token_ids[num_computed_tokens:num_computed_tokens + n]` next.
    `block_tables` (one per KV cache group) are owned by the KV cache manager; the sequence only
    holds references to them.
    """

    request_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int
    arrival_t: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_tables: tuple[list[int], ...] = ()
    num_cached_prompt_tokens: int | None = None  # prefix hit at first schedule
    num_preemptions: int = 0
    first_token_t: float | None = None
    finish_t: float | None = None
    finish_reason: str | None = None
    label: str | None = None  # the workload file's id for the request, shown beside request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
