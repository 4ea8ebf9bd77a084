"""DataFrame shaping for the pages: derived step metrics, latency percentiles, config diffs.

Pure pandas, no Streamlit: the chart builders draw what these functions return, and tests call
them directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

# Per-step series the pages plot, with the label a person reads.
SERIES_LABELS: dict[str, str] = {
    "tokens_per_s": "throughput (tokens/s)",
    "blocks_used": "blocks in use",
    "hit_rate": "prefix hit rate (cumulative)",
    "evictions": "evictions (cumulative)",
    "preemptions": "preemptions (cumulative)",
    "num_running": "running requests",
    "num_waiting": "waiting requests",
    "kv_mib_used": "KV MiB in use",
}


def step_metrics(steps: pd.DataFrame, window: int = 8) -> pd.DataFrame:
    """Add the derived series the charts use to a StepRecord frame (one row per step).

    Throughput is a rolling ratio (tokens over seconds across `window` steps) because a single
    step's duration is too noisy to read; hit rate, evictions and preemptions are cumulative so
    runs of different lengths compare at a glance.
    """
    df = steps.sort_values("step").reset_index(drop=True).copy()
    if df.empty:
        for col in ("tokens_per_s", "hit_rate", "evictions", "preemptions", "kv_mib_used"):
            df[col] = pd.Series(dtype=float)
        return df
    tokens = df["num_generated_tokens"].rolling(window, min_periods=1).sum()
    seconds = df["duration_s"].rolling(window, min_periods=1).sum()
    df["tokens_per_s"] = (tokens / seconds.where(seconds > 0)).fillna(0.0)
    queried = df["prefix_query_tokens"].cumsum()
    df["hit_rate"] = (df["prefix_hit_tokens"].cumsum() / queried.where(queried > 0)).fillna(0.0)
    df["evictions"] = df["num_evicted"].cumsum()
    df["preemptions"] = df["num_preempted"].cumsum()
    df["kv_mib_used"] = df["kv_bytes_used"] / 2**20
    return df


def downsample(df: pd.DataFrame, max_points: int = 1500) -> pd.DataFrame:
    """Every k-th row (always keeping the last) so a 10,000-step run stays light in the browser."""
    if len(df) <= max_points:
        return df
    k = int(np.ceil(len(df) / max_points))
    keep = np.zeros(len(df), dtype=bool)
    keep[::k] = True
    keep[-1] = True
    return df[keep]


def block_mix(steps: pd.DataFrame) -> pd.DataFrame:
    """Long frame (step, state, blocks): in use / free but cached / free, for a stacked area."""
    if steps.empty:
        return pd.DataFrame(columns=["step", "state", "blocks"])
    wide = pd.DataFrame({
        "step": steps["step"],
        "in use": steps["blocks_used"],
        "free, cached": steps["blocks_cached_free"],
        "free": steps["blocks_free"] - steps["blocks_cached_free"],
    })
    return wide.melt("step", var_name="state", value_name="blocks")


def with_request_labels(events: pd.DataFrame, requests: pd.DataFrame) -> pd.DataFrame:
    """`events` with a `label` column: each request's own id from its workload file ("" when
    it has none, or while it is still running and has no record yet)."""
    labels = (requests.set_index("request_id")["label"] if "label" in requests
              else pd.Series(dtype=object))
    out = events.copy()
    out["label"] = out["request_id"].map(labels).astype(object).where(
        lambda s: s.notna(), "")
    return out


def latencies(requests: pd.DataFrame) -> pd.DataFrame:
    """Per-request TTFT and TPOT in seconds (NaN where a request never produced the token)."""
    if requests.empty:
        return pd.DataFrame(columns=["request_id", "ttft_s", "tpot_s"])
    out = pd.DataFrame({"request_id": requests["request_id"]})
    first = pd.to_numeric(requests["first_token_t"], errors="coerce")
    finish = pd.to_numeric(requests["finish_t"], errors="coerce")
    out["ttft_s"] = first - requests["arrival_t"]
    decodes = (requests["output_tokens"] - 1).where(requests["output_tokens"] > 1)
    out["tpot_s"] = (finish - first) / decodes
    return out


def latency_percentiles(requests_by_run: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per run: TTFT and TPOT p50/p90/p99 in milliseconds."""
    rows = []
    for label, requests in requests_by_run.items():
        lat = latencies(requests)
        row: dict[str, Any] = {"run": label, "requests": len(lat)}
        for metric in ("ttft_s", "tpot_s"):
            values = lat[metric].dropna() if not lat.empty else pd.Series(dtype=float)
            for q in (50, 90, 99):
                name = f"{metric[:-2].upper()} p{q} (ms)"
                row[name] = float(np.percentile(values, q) * 1000) if len(values) else None
        rows.append(row)
    return pd.DataFrame(rows)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_diff(configs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The config fields whose values differ between runs: index = field, one column per run."""
    flat = {label: flatten(cfg) for label, cfg in configs.items()}
    fields = sorted({f for cfg in flat.values() for f in cfg})
    rows = {}
    for f in fields:
        values = [flat[label].get(f) for label in flat]
        if len({repr(v) for v in values}) > 1:
            rows[f] = ["—" if v is None else str(v) for v in values]
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(flat)).rename_axis("field")


def stack_runs(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-run frames (e.g. step_metrics output) stacked into one with a `run` column."""
    parts = [df.assign(run=label) for label, df in frames.items()]
    if not parts:
        return pd.DataFrame(columns=["run", "step", *SERIES_LABELS])
    return pd.concat(parts, ignore_index=True)


SUMMARY_FIELDS = {
    "output_tokens_per_s": "output tokens/s", "prefix_hit_rate": "prefix hit rate",
    "num_preemptions": "preemptions", "num_evictions": "evictions",
    "peak_blocks_used": "peak blocks in use", "num_blocks": "blocks", "steps": "steps",
    "elapsed_s": "elapsed s", "num_finished": "requests finished",
}


def summary_table(summaries: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Headline figures side by side: index = figure, one column per run."""
    rows = {label: [summary.get(key) for summary in summaries.values()]
            for key, label in SUMMARY_FIELDS.items()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(summaries))
