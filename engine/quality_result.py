"""The figures of one quality evaluation (engine/quality.py), torch-free so the store can
derive its table from them (store/trace_columns.py) as it does for the trace."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class QualityResult:
    """One evaluation: the figures and the settings that produced them."""

    kl_mean: float  # mean over scored positions of KL(ref || candidate), nats
    top1: float  # share of positions where both pick the same next token
    ppl_ref: float  # perplexity of the fp32 full cache on the real next tokens
    ppl: float  # ... and of the candidate
    kv_bytes_per_token: float  # bytes of the blocks held when scoring ended / context tokens
    kv_dtype: str
    kv_rotate: bool
    policy: str
    model: str
    block_size: int
    context: int
    num_passages: int
    num_tokens_scored: int
    source: str  # "held set" or the text file's name
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
