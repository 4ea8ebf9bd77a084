"""The Quality page's helpers: the bytes-vs-KL chart and an evaluation on a background thread.

Every stored evaluation is a point: KV bytes per token of context (x) against KL divergence
from the fp32 full cache (y). The fp32 full cache itself sits at KL 0, the right-hand corner of
a trade-off where lower-left is better.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import altair as alt
import pandas as pd

from engine.config import RunConfig
from store import Store

TABLE_COLUMNS = ["id", "kv_dtype", "kv_rotate", "policy", "block_size", "kl_mean", "top1",
                 "ppl", "ppl_ref", "kv_bytes_per_token", "num_tokens_scored", "model",
                 "context", "source", "created_at"]


def label(row: pd.Series) -> str:
    """'int4 + rotation · full' for legends and tables."""
    rotate = " + rotation" if row["kv_rotate"] else ""
    return f"{row['kv_dtype']}{rotate} · {row['policy']}"


def tradeoff_chart(results: pd.DataFrame) -> alt.LayerChart:
    """KV bytes per token (x) against mean KL from the fp32 full cache (y), one point per
    evaluation, coloured by format; the fp32 reference drawn as a ring at KL 0."""
    data = results.assign(config=results.apply(label, axis=1) if len(results) else [],
                          top1_pct=100 * results["top1"])
    base = alt.Chart(data, title="what a cache format costs: bytes per token vs KL from fp32")
    x = alt.X("kv_bytes_per_token:Q", title="KV bytes per token of context")
    y = alt.Y("kl_mean:Q", title="mean KL(fp32 || cache), nats per token")
    points = base.mark_circle(size=90, opacity=0.85).encode(
        x=x, y=y, color=alt.Color("config:N", title="cache"),
        tooltip=[alt.Tooltip("config:N", title="cache"), alt.Tooltip("model:N"),
                 alt.Tooltip("kl_mean:Q", format=".5f", title="KL"),
                 alt.Tooltip("top1_pct:Q", format=".2f", title="top-1 %"),
                 alt.Tooltip("ppl:Q", format=".3f"), alt.Tooltip("ppl_ref:Q", format=".3f"),
                 alt.Tooltip("kv_bytes_per_token:Q", format=",.1f", title="bytes/token"),
                 alt.Tooltip("num_tokens_scored:Q", title="tokens scored"),
                 alt.Tooltip("id:Q", title="result")])
    reference = data[(data["kv_dtype"] == "fp32") & (data["policy"] == "full")]
    ring = alt.Chart(reference).mark_point(size=260, shape="circle", filled=False,
                                           color="#111827").encode(x=x, y=y)
    return alt.layer(points, ring)


class QualityJob:
    """One evaluation on a background thread; the page polls `fraction`, `done`, `error`.
    Only the thread writes the fields (each is replaced whole), so reads need no lock."""

    def __init__(self, store: Store, config: RunConfig, *, context: int, num_scored: int,
                 passages: int, load: Callable[[RunConfig], Any]) -> None:
        self.store, self.config = store, config
        self.context, self.num_scored, self.passages = context, num_scored, passages
        self._load = load
        self.fraction = 0.0
        self.phase = "loading model"
        self.result_id: int | None = None
        self.figures: dict[str, Any] | None = None
        self.error: str | None = None
        self.details: str | None = None
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="kvlab-quality", daemon=True)

    def start(self) -> QualityJob:
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return self.result_id is not None or self.error is not None

    def _main(self) -> None:
        from engine.quality import QualityError, evaluate, held_set, passage_tokens
        from store.quality import save_quality

        try:
            loaded = self._load(self.config)
            self.phase = "scoring"
            passages = passage_tokens(held_set(self.passages), loaded.tokenizer, self.context)
            result = evaluate(self.config, loaded, passages, context=self.context,
                              num_scored=self.num_scored, on_progress=self._progress)
            self.figures = result.to_dict()
            self.result_id = save_quality(self.store, result, self.config)
            self.phase = "done"
        except QualityError as exc:
            self.error = str(exc)
        except Exception as exc:  # shown as one line, the traceback in an expander
            self.error = f"{type(exc).__name__}: {exc}"
            self.details = traceback.format_exc()

    def _progress(self, fraction: float) -> None:
        self.fraction = fraction
