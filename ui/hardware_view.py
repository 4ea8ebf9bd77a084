"""The Hardware page's charts: where a run's memory went, the device's own readings over time
beside the engine's throughput, and each decode step against its roofline bound."""

from __future__ import annotations

import altair as alt
import pandas as pd

MEMORY_PARTS = (("weights", "weights_bytes"), ("activations (peak)", "activation_peak_bytes"),
                ("KV cache", "kv_cache_bytes"), ("other torch", "other_torch_bytes"),
                ("non-torch", "non_torch_bytes"))
TELEMETRY_LABELS = {"rss_bytes": "process RSS (MiB)", "cpu_pct": "CPU (% of one core)",
                    "gpu_memory_used_bytes": "GPU memory used (MiB)",
                    "gpu_util_pct": "GPU utilisation (%)", "memory_util_pct":
                    "GPU memory-controller utilisation (%)", "power_w": "power (W)",
                    "sm_clock_mhz": "SM clock (MHz)", "temperature_c": "temperature (°C)"}


def memory_frame(profile: dict) -> pd.DataFrame:
    """The profile's parts in MiB, in stacking order."""
    rows = [{"part": label, "MiB": profile.get(key, 0) / 2**20, "order": i}
            for i, (label, key) in enumerate(MEMORY_PARTS)]
    return pd.DataFrame(rows)


def memory_chart(profile: dict) -> alt.Chart:
    """One stacked bar: the run's memory by part, with the device memory for scale."""
    data = memory_frame(profile).assign(run="this run")
    total = data["MiB"].sum()
    return alt.Chart(data, title=f"memory at engine start: {total:,.0f} MiB in all").mark_bar(
    ).encode(
        x=alt.X("sum(MiB):Q", title="MiB"),
        y=alt.Y("run:N", title=None),
        color=alt.Color("part:N", sort=[p for p, _ in MEMORY_PARTS], title=None),
        order=alt.Order("order:Q"),
        tooltip=[alt.Tooltip("part:N"), alt.Tooltip("MiB:Q", format=",.1f")])


def telemetry_chart(samples: pd.DataFrame, column: str) -> alt.Chart:
    scale = 2**20 if column.endswith("_bytes") else 1
    data = pd.DataFrame({"t": samples["t"], "value": samples[column] / scale})
    return alt.Chart(data, title=TELEMETRY_LABELS.get(column, column)).mark_line().encode(
        x=alt.X("t:Q", title="seconds"), y=alt.Y("value:Q", title=None))


def throughput_chart(steps: pd.DataFrame) -> alt.Chart:
    """Generated tokens per second over time (1 s windows), for the telemetry beside it."""
    data = pd.DataFrame({"t": steps["t"].astype(float).round(0),
                         "tokens": steps["num_generated_tokens"]}).groupby("t", as_index=False
                                                                          ).sum()
    return alt.Chart(data, title="generated tokens per second").mark_line(
        interpolate="step-after").encode(x=alt.X("t:Q", title="seconds"),
                                         y=alt.Y("tokens:Q", title=None))


def roofline_frame(steps: pd.DataFrame) -> pd.DataFrame:
    """Decode steps with a bound: measured and bound milliseconds and their ratio."""
    if "roofline_s" not in steps or steps["roofline_s"].isna().all():
        return pd.DataFrame(columns=["step", "measured_ms", "bound_ms", "ratio"])
    decode = steps.dropna(subset=["roofline_s"])
    return pd.DataFrame({"step": decode["step"], "measured_ms": 1000 * decode["duration_s"],
                         "bound_ms": 1000 * decode["roofline_s"],
                         "ratio": decode["duration_s"] / decode["roofline_s"]})


def roofline_chart(frame: pd.DataFrame) -> alt.Chart:
    long = frame.melt(id_vars=["step"], value_vars=["measured_ms", "bound_ms"],
                      var_name="series", value_name="ms")
    return alt.Chart(long, title="decode step time vs its roofline bound").mark_line().encode(
        x=alt.X("step:Q"), y=alt.Y("ms:Q", title="milliseconds"),
        color=alt.Color("series:N", title=None,
                        scale=alt.Scale(domain=["measured_ms", "bound_ms"],
                                        range=["#2563eb", "#dc2626"])))
