"""The Sweep page's axes form: up to `MAX_AXES` rows of (setting, values), plus repeats, a
random sample and the parallelism, checked into a `SweepSpec` on every change.

The base config comes from the Experiment form (ui.config_form); an axis's values are typed as
on the command line (`8,16,32`, `4MiB,16MiB`, `true,false`) and parsed by sweep.spec, so the
page and `cli.py sweep` accept and refuse the same things with the same messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import streamlit as st

from engine.config import ConfigError, RunConfig
from sweep.spec import SweepError, SweepSpec, field_types, parse_axis

MAX_AXES = 3
NO_AXIS = "—"
# The knobs people sweep first; every other RunConfig setting follows in name order.
PREFERRED = ("block_size", "kv_budget", "num_blocks", "kv_dtype", "enable_prefix_caching",
             "max_num_seqs", "max_num_batched_tokens", "max_model_len", "seed")
DEFAULT_AXES = (("block_size", "8,16,32"), (NO_AXIS, ""), (NO_AXIS, ""))
EXAMPLES = {"block_size": "8,16,32", "kv_budget": "1MiB,4MiB,16MiB", "num_blocks": "64,128,256",
            "kv_dtype": "fp32,bf16", "enable_prefix_caching": "true,false",
            "max_num_seqs": "2,4,8", "seed": "0,1,2"}


def axis_options() -> list[str]:
    fields = [n for n in field_types() if n != "kv_budget_bytes"]  # swept as kv_budget (sizes)
    return [NO_AXIS, *PREFERRED, *sorted(n for n in fields if n not in PREFERRED)]


@dataclass
class AxesForm:
    rows: list[tuple[str, str]]  # (axis name, values text) of the rows in use
    repeat: int
    sample: int | None
    max_parallel: int
    slots: dict[str, Any]  # error containers: "axis0".."axisN", "general"

    def show_error(self, message: str) -> None:
        for i, (name, _) in enumerate(self.rows):
            if message.startswith((f"axis {name}", f"--axis {name}", f"axis {name!r}")):
                self.slots[f"axis{i}"].error(message, icon=":material/warning:")
                return
        self.slots["general"].error(message, icon=":material/warning:")


def render_axes_form() -> AxesForm:
    """The axis rows, repeats, sample and parallelism; returns their raw values."""
    options = axis_options()
    rows, slots = [], {}
    for i, (default_name, default_values) in enumerate(DEFAULT_AXES):
        left, right = st.columns([1, 2])
        with left:
            name = st.selectbox(f"axis {i + 1}", options, index=options.index(default_name),
                                key=f"sweep_axis{i}_name")
        with right:
            values = st.text_input("values (comma-separated)", default_values,
                                   key=f"sweep_axis{i}_values", disabled=name == NO_AXIS,
                                   placeholder=EXAMPLES.get(name, "v1,v2,..."),
                                   help="as on the command line: 8,16,32 · 4MiB,16MiB · "
                                        "true,false · none for a default")
            slots[f"axis{len(rows)}"] = st.empty()
        if name != NO_AXIS:
            rows.append((name, values))
    c = st.columns(3)
    with c[0]:
        repeat = st.number_input("repeat each point", 1, 20, 1, key="sweep_repeat")
    with c[1]:
        sample = st.number_input("random sample of grid points (0: all)", 0, 10_000, 0,
                                 key="sweep_sample")
    with c[2]:
        parallel = st.number_input("points at once (local Ray)", 1, 64,
                                   min(2, os.cpu_count() or 1), key="sweep_parallel",
                                   help="each point gets cores / this many torch threads")
    slots["general"] = st.empty()
    return AxesForm(rows, int(repeat), int(sample) or None, int(parallel), slots)


def build_spec(base: RunConfig, form: AxesForm, name: str | None) -> SweepSpec | None:
    """The sweep, or None after showing why not under the row it concerns."""
    if not form.rows:
        form.slots["general"].info("Choose at least one axis to sweep.",
                                   icon=":material/arrow_upward:")
        return None
    try:
        axes = [parse_axis(f"{axis}={values}") for axis, values in form.rows]
        return SweepSpec(base, axes, repeat=form.repeat, sample=form.sample, name=name)
    except SweepError as exc:
        form.show_error(str(exc))
        return None


def describe_points(spec: SweepSpec) -> str:
    """'12 points (3 block_size x 2 kv_budget x 2 repeats); 1 invalid combination ...'."""
    shape = " × ".join(f"{len(a.values)} {a.name}" for a in spec.axes)
    if spec.repeat > 1:
        shape += f" × {spec.repeat} repeats"
    if spec.sample is not None and spec.sample < spec.grid_size:
        shape = f"a sample of {spec.sample} of {spec.grid_size}: {shape}"
    invalid = sum(isinstance(c, ConfigError) for c in spec.point_configs())
    note = (f"; {invalid} invalid in combination (recorded as failed, not run)"
            if invalid else "")
    return f"**{spec.num_points} points** ({shape}){note}"
