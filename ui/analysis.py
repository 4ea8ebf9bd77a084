"""DataFrame shaping for the pages: derived step metrics, latency percentiles, config diffs.

Pure pandas, no Streamlit: the chart builders draw what these functions return, and tests call
them directly.
"""

from __future__ import annotations

import re
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
    "kv_usage_pct": "KV cache usage (%)",
}
# Per-step (not cumulative) charts of Replay, each from several StepRecord columns.
PER_STEP_SERIES: dict[str, tuple[str, dict[str, str]]] = {  # name -> (title, column -> label)
    "prefix_per_step": ("prefix cache per step (tokens)",
                        {"prefix_query_tokens": "looked up", "prefix_hit_tokens": "hit"}),
    "tokens_per_step": ("tokens per step",
                        {"num_prefill_tokens": "prefill", "num_decode_tokens": "decode"}),
}
# Steps worth jumping to: name -> the StepRecord column that is > 0 there.
JUMP_KINDS = {"preemption": "num_preempted", "eviction": "num_evicted",
              "prefix hit": "prefix_hit_tokens"}


def step_metrics(steps: pd.DataFrame, window: int = 8) -> pd.DataFrame:
    """Add the derived series the charts use to a StepRecord frame (one row per step).

    Throughput is a rolling ratio (tokens over seconds across `window` steps) because a single
    step's duration is too noisy to read; hit rate, evictions and preemptions are cumulative so
    runs of different lengths compare at a glance.
    """
    df = steps.sort_values("step").reset_index(drop=True).copy()
    if df.empty:
        for col in ("tokens_per_s", "hit_rate", "evictions", "preemptions", "kv_mib_used",
                    "kv_usage_pct"):
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
    # vLLM's kv_cache_usage_perc: blocks in use over all blocks (cached free ones are free)
    total = df["blocks_used"] + df["blocks_free"]
    df["kv_usage_pct"] = (100 * df["blocks_used"] / total.where(total > 0)).fillna(0.0)
    return df


def per_step_long(steps: pd.DataFrame, name: str) -> pd.DataFrame:
    """Long frame (step, t, series, value) of one PER_STEP_SERIES chart."""
    _, columns = PER_STEP_SERIES[name]
    if steps.empty:
        return pd.DataFrame(columns=["step", "t", "series", "value"])
    wide = steps[["step", "t", *columns]].rename(columns=columns)
    return wide.melt(["step", "t"], var_name="series", value_name="value")


def jump_steps(steps: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per JUMP_KINDS name, the sorted steps where it happened."""
    return {kind: np.sort(steps.loc[steps[column] > 0, "step"].to_numpy(dtype=np.int64))
            for kind, column in JUMP_KINDS.items()}


def neighbour(candidates: np.ndarray, step: int, forward: bool) -> int | None:
    """The first of `candidates` (sorted) after `step`, or the last before it."""
    if forward:
        i = int(np.searchsorted(candidates, step, side="right"))
        return int(candidates[i]) if i < len(candidates) else None
    i = int(np.searchsorted(candidates, step, side="left")) - 1
    return int(candidates[i]) if i >= 0 else None


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


REQUEST_TABLE_COLUMNS = {
    "request_id": "request", "prompt_tokens": "prompt tokens",
    "cached_prompt_tokens": "cached prompt tokens", "output_tokens": "output tokens",
    "ttft_ms": "TTFT (ms)", "tpot_ms": "mean TPOT (ms)", "num_preemptions": "preemptions",
    "finish_reason": "finish or rejection reason",
}


def request_table(requests: pd.DataFrame) -> pd.DataFrame:
    """One row per request as a person reads it (REQUEST_TABLE_COLUMNS), in request order; a
    rejected request is a row with its reason. Extra columns (a file's own id) are kept."""
    lat = latencies(requests)
    table = requests.assign(ttft_ms=lat["ttft_s"].to_numpy() * 1000,
                            tpot_ms=lat["tpot_s"].to_numpy() * 1000)
    extra = [c for c in table.columns if c not in REQUEST_TABLE_COLUMNS
             and c not in ("arrival_t", "first_token_t", "finish_t")]
    table = table[[*REQUEST_TABLE_COLUMNS, *extra]].rename(columns=REQUEST_TABLE_COLUMNS)
    return table.sort_values("request", kind="stable").reset_index(drop=True)


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
    """The settings (`chosen_settings`) whose values differ between runs: index = field, one
    column per run."""
    flat = {label: chosen_settings(cfg) for label, cfg in configs.items()}
    fields = sorted({f for cfg in flat.values() for f in cfg})
    rows = {}
    for f in fields:
        values = [flat[label].get(f) for label in flat]
        if len({repr(v) for v in values}) > 1:
            rows[f] = ["—" if v is None else str(v) for v in values]
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(flat)).rename_axis("field")


UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{16}-")  # ui.config_form.save_upload's content hash


def chosen_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A RunConfig dict flattened to what a person chose: the workload's own kind's fields
    only, and a workload file by its name, not the path it has on the server."""
    flat = flatten(config)
    kind = flat.get("workload.kind")
    keep_workload = {"preset": {"workload.name"}, "file": {"workload.path"}}.get(kind)
    out = {}
    for key, value in flat.items():
        if key.startswith("workload.") and key != "workload.kind":
            if keep_workload is not None and key not in keep_workload:
                continue
            if kind == "synthetic" and key in ("workload.name", "workload.path"):
                continue
        if key == "workload.path":
            key, value = "workload.file", _file_name(value)
        out[key] = value
    return out


def _file_name(path: Any) -> Any:
    if not isinstance(path, str):
        return path
    return UPLOAD_PREFIX.sub("", path.replace("\\", "/").rsplit("/", 1)[-1])


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


def story(steps: pd.DataFrame, request_events: pd.DataFrame) -> tuple[int, str] | None:
    """The step a first look at a run should start at, and one line on what to look at there:
    the first preemption, else the first eviction, else the first prefix hit."""
    jumps = jump_steps(steps)
    if len(jumps["preemption"]):
        step = int(jumps["preemption"][0])
        who = request_events.loc[(request_events["step"] == step)
                                 & (request_events["kind"] == "preempt"), "request_id"]
        name = f"request {int(who.iloc[0])}" if len(who) else "a request"
        return step, (f"Step {step}: the cache ran out of blocks, so {name} was preempted: its "
                      "blocks went back to the free queue (its hashed ones stay cached, in "
                      "amber) and it recomputes later, re-hitting them. Jump on to the "
                      "evictions and prefix hits with the buttons below.")
    if len(jumps["eviction"]):
        step = int(jumps["eviction"][0])
        return step, (f"Step {step}: the free queue had no unhashed block left, so the least "
                      "recently used cached block was evicted (its hash dropped) and reused.")
    if len(jumps["prefix hit"]):
        step = int(jumps["prefix hit"][0])
        return step, (f"Step {step}: a request found its prompt's first blocks in the prefix "
                      "cache; the shared blocks show their ref count.")
    return None
