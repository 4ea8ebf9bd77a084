"""The Experiment form: a widget per RunConfig knob, validated on every change.

`render_config_form()` lays the widgets out and leaves an empty slot under each; the page
passes the values and slots to `validate()`, which builds the config (`config_from_values()`)
or puts its `ConfigError` in the slot of the widget it names, so a bad setting is explained
where it was made, before running. The number inputs have no bounds of their own: a bound
would make the browser silently keep the previous value; the message names the widget's label.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import streamlit as st

from engine.config import DEVICES, DTYPES, KV_DTYPES, ConfigError, RunConfig, parse_bytes
from engine.models.config import MODEL_CONFIGS
from engine.workload import PRESETS, WorkloadError, parse_workload_bytes
from ui import format as fmt

UPLOAD_DIR = Path(__file__).resolve().parent.parent / "data" / "uploads"
BUDGET_MODES = ("default", "blocks", "bytes")
BUDGET_LABELS = {"default": "default (1024 blocks, or one full-length request)",
                 "blocks": "a number of blocks", "bytes": "a byte budget"}
# ConfigError.field -> the slot (widget) it is shown under.
_SLOT_OF = {"kv_budget_bytes": "kv_budget", "workload.kind": "workload_kind",
            "workload.name": "preset"}
WORKLOAD_NUMBERS = (  # (field, label, min, default, step) of the synthetic generator
    ("num_requests", "requests", 1, 8, 1),
    ("arrival_rate", "arrival rate (req/s, 0: all at once)", 0.0, 0.0, 0.5),
    ("prompt_len_min", "prompt tokens min", 1, 16, 8),
    ("prompt_len_max", "prompt tokens max", 1, 64, 8),
    ("output_len_min", "output tokens min", 1, 8, 8),
    ("output_len_max", "output tokens max", 1, 32, 8),
    ("num_prefix_groups", "shared-prefix groups", 0, 0, 1),
    ("shared_prefix_len", "shared prefix tokens", 0, 64, 16),
    ("num_turns", "turns per conversation", 1, 1, 1),
)


class Slots:
    """Empty containers under the widgets, by the knob they belong to, and the widgets' labels
    (an error names the widget as the person sees it, not the config field)."""

    def __init__(self) -> None:
        self._slots: dict[str, Any] = {}
        self._labels: dict[str, str] = {}

    def add(self, name: str, label: str | None = None) -> None:
        self._slots[name] = st.empty()
        if label:
            self._labels[name] = label

    def show_error(self, field: str, message: str) -> None:
        name = _SLOT_OF.get(field, field)
        if name not in self._slots:
            name = name.removeprefix("workload.")
        label = self._labels.get(name)
        if label and message.startswith(f"{field}: "):
            message = f"{label}: {message.removeprefix(f'{field}: ')}"
        (self._slots.get(name) or self._slots["general"]).error(message,
                                                               icon=":material/warning:")


def _number(slots: Slots, label: str, key: str, value: int | float, min_value: int | float | None,
            step: int | float, help: str | None = None) -> int | float:
    """A number input without bounds (`min_value` is what validation enforces, see the module
    docstring); its value is never None: an emptied field reads as 0, which is then refused."""
    del min_value
    out = st.number_input(label, value=value, step=step, key=f"cfg_{key}", help=help)
    slots.add(key, label)
    return 0 if out is None else out


def _select(slots: Slots, label: str, key: str, options: list | tuple, index: int = 0,
            help: str | None = None) -> Any:
    out = st.selectbox(label, options, index=index, key=f"cfg_{key}", help=help)
    slots.add(key, label)
    return out


def render_config_form(default_model: str = "smollm2") -> tuple[dict[str, Any], Slots]:
    """All the knobs; returns raw values (config_from_values' input) and the error slots."""
    slots, v = Slots(), {}
    models = sorted(MODEL_CONFIGS)
    st.subheader("Model and device")
    c = st.columns(4)
    with c[0]:
        v["model"] = _select(slots, "model", "model", models, models.index(default_model))
    with c[1]:
        v["device"] = _select(slots, "device", "device", DEVICES)
    with c[2]:
        v["dtype"] = _select(slots, "weights dtype", "dtype", DTYPES)
    with c[3]:
        v["seed"] = _number(slots, "seed", "seed", 0, 0, 1)
    st.subheader("KV cache")
    c = st.columns(4)
    with c[0]:
        v["block_size"] = _number(slots, "block size (tokens)", "block_size", 16, 1, 1,
                                  help="tokens per KV block; a power of two")
    with c[1]:
        v["kv_dtype"] = _select(slots, "KV dtype", "kv_dtype", KV_DTYPES)
    with c[2]:
        v["budget_mode"] = st.radio("KV budget", BUDGET_MODES, key="cfg_budget_mode",
                                    format_func=BUDGET_LABELS.get)
        slots.add("budget_mode", "KV budget")
    with c[3]:
        if v["budget_mode"] == "blocks":
            v["num_blocks"] = _number(slots, "number of blocks", "num_blocks", 256, 1, 16)
        elif v["budget_mode"] == "bytes":
            v["kv_budget"] = st.text_input("KV budget (bytes)", "64MiB", key="cfg_kv_budget",
                                           help="e.g. 64MiB, 1.5GiB, 500MB")
            slots.add("kv_budget", "KV budget (bytes)")
    c = st.columns(4)
    with c[0]:
        v["enable_prefix_caching"] = st.toggle("prefix caching", True, key="cfg_prefix")
    with c[1]:
        v["keyframe_interval"] = _number(slots, "keyframe every (steps)", "keyframe_interval",
                                         50, 1, 10)
    with c[2]:
        presets = policy_presets(MODEL_CONFIGS[v["model"]])
        st.selectbox("policy preset", list(presets), key="cfg_policy_preset",
                     on_change=_apply_preset, args=(presets,),
                     help="fills the layer policy; edit it there")
    with c[3]:
        if "cfg_policy" not in st.session_state:
            st.session_state["cfg_policy"] = "full"
        v["policy"] = st.text_input(
            "layer policy", key="cfg_policy",
            help="what each layer or KV head range keeps: full, window(sink,recent), "
                 "h2o(heavy,recent), snapkv(budget,window), pyramid(total=T,beta=20); by "
                 "range, e.g. '0:full; 1-29:window(4,256)' or '0-29/h0:full; 0-29/h1-2:"
                 "window(4,128)' (each range is a KV cache group with its own block tables)")
        slots.add("policy", "layer policy")
    st.subheader("Scheduler")
    c = st.columns(3)
    with c[0]:
        v["max_num_seqs"] = _number(slots, "max running requests", "max_num_seqs", 8, 1, 1)
    with c[1]:
        v["max_num_batched_tokens"] = _number(slots, "token budget per step",
                                              "max_num_batched_tokens", 512, 1, 64)
    with c[2]:
        v["max_model_len"] = _number(slots, "max model length (0: the model's)", "max_model_len",
                                     0, 0, 256)
    with st.expander("Sampling"):
        c = st.columns(4)
        with c[0]:
            v["temperature"] = _number(slots, "temperature (0: greedy)", "temperature", 0.0,
                                       None, 0.1)
        with c[1]:
            v["top_p"] = _number(slots, "top-p", "top_p", 1.0, None, 0.05)
        with c[2]:
            v["top_k"] = _number(slots, "top-k (0: off)", "top_k", 0, None, 1)
        with c[3]:
            v["ignore_eos"] = st.toggle("ignore EOS", False, key="cfg_ignore_eos")
    _render_workload(slots, v)
    v["name"] = st.text_input("run name (optional)", key="cfg_name")
    slots.add("general")
    return v, slots


def policy_presets(model: Any) -> dict[str, str]:
    """Named retention settings for this model's shape (layer and KV head counts)."""
    last, heads = model.num_layers - 1, model.num_kv_heads
    presets = {"all layers full": "full", "StreamingLLM 4+256 on every layer": "window(4,256)"}
    if last >= 2:
        presets["full first and last layers, window elsewhere"] = (
            f"0:full; 1-{last - 1}:window(4,256); {last}:full")
    if heads >= 2:
        half = max(1, heads // 2)
        full = "h0" if half == 1 else f"h0-{half - 1}"
        rest = f"h{half}" if half == heads - 1 else f"h{half}-{heads - 1}"
        presets["DuoAttention-style: half the KV heads full, the rest sink + window"] = (
            f"0-{last}/{full}:full; 0-{last}/{rest}:window(4,128)")
    return presets


def _apply_preset(presets: dict[str, str]) -> None:
    st.session_state["cfg_policy"] = presets[st.session_state["cfg_policy_preset"]]


def _render_workload(slots: Slots, v: dict[str, Any]) -> None:
    st.subheader("Workload")
    v["workload_kind"] = st.radio("requests from", ("preset", "synthetic", "file"),
                                  horizontal=True, key="cfg_workload_kind")
    slots.add("workload_kind")
    if v["workload_kind"] == "preset":
        names = list(PRESETS)
        v["preset"] = _select(slots, "preset", "preset", names, names.index("shared-prefix"))
        st.caption(PRESETS[v["preset"]].description)
    elif v["workload_kind"] == "synthetic":
        cols = st.columns(3)
        for i, (name, label, low, default, step) in enumerate(WORKLOAD_NUMBERS):
            with cols[i % 3]:
                v[name] = _number(slots, label, name, default, low, step)
    else:
        upload = st.file_uploader("workload file (JSON lines, OpenAI batch or ShareGPT)",
                                  type=["jsonl", "json", "txt"], key="cfg_upload")
        slots.add("path")
        v["path"], v["upload_error"] = save_upload(upload) if upload else (None, None)


def save_upload(upload: Any) -> tuple[str | None, str | None]:
    """Validate an uploaded workload (any format, the CLI's default limits) and keep it under
    data/uploads/ (named by content)."""
    data = upload.getvalue()
    try:
        loaded = parse_workload_bytes(data, source=upload.name)
    except WorkloadError as e:
        return None, str(e)
    st.caption(loaded.describe())
    UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
    path = UPLOAD_DIR / f"{hashlib.sha256(data).hexdigest()[:16]}-{Path(upload.name).name}"
    path.write_bytes(data)
    return str(path), None


def config_from_values(v: dict[str, Any]) -> RunConfig:
    """Raw form values -> a RunConfig, or the ConfigError that says what to fix."""
    if v.get("upload_error"):
        raise ConfigError("workload.path", v["upload_error"])
    workload: dict[str, Any] = {"kind": v["workload_kind"]}
    if v["workload_kind"] == "preset":
        workload["name"] = v["preset"]
    elif v["workload_kind"] == "file":
        workload["path"] = v.get("path")
    else:
        workload.update({name: v[name] for name, *_ in WORKLOAD_NUMBERS})
    budget: dict[str, Any] = {}
    if v["budget_mode"] == "blocks":
        budget["num_blocks"] = int(v["num_blocks"])
    elif v["budget_mode"] == "bytes":
        budget["kv_budget_bytes"] = parse_bytes(v["kv_budget"])
    return RunConfig(
        model=v["model"], device=v["device"], dtype=v["dtype"], kv_dtype=v["kv_dtype"],
        block_size=int(v["block_size"]), enable_prefix_caching=bool(v["enable_prefix_caching"]),
        max_num_seqs=int(v["max_num_seqs"]),
        max_num_batched_tokens=int(v["max_num_batched_tokens"]),
        max_model_len=int(v["max_model_len"]) or None,
        keyframe_interval=int(v["keyframe_interval"]), seed=int(v["seed"]),
        policy=v.get("policy") or "full",
        sampling={"temperature": float(v["temperature"]), "top_p": float(v["top_p"]),
                  "top_k": int(v["top_k"]), "ignore_eos": bool(v["ignore_eos"])},
        workload=workload, **budget,
    )


def validate(v: dict[str, Any], slots: Slots) -> RunConfig | None:
    """The config, or None after showing its error under the widget it concerns."""
    try:
        if int(v["seed"]) < 0:
            raise ConfigError("seed", "must be >= 0")
        config = config_from_values(v)
    except ConfigError as e:
        slots.show_error(e.field, str(e))
        return None
    memory = device_memory(config.device)
    if memory is None:
        slots.show_error("device", "device: no CUDA device on this machine; use cpu or auto")
        return None
    problem = budget_problem(config, *memory)
    if problem is not None:
        field = {"blocks": "num_blocks", "bytes": "kv_budget"}.get(v["budget_mode"],
                                                                   "budget_mode")
        slots.show_error(field, f"{field}: {problem}")
        return None
    return config


def device_memory(device: str) -> tuple[str, str, int] | None:
    """(device type, whose memory, bytes) where a run's KV cache would live; None for "cuda"
    on a machine without one. torch is imported only when a GPU may be there: the page stays
    light on a CPU machine (and never reads a torch that another thread is still importing)."""
    if device == "cpu" or (device == "auto" and not _maybe_nvidia()):
        return "cpu", "this machine's", _physical_memory()
    import torch  # waits for an import in progress on another thread

    if torch.cuda.is_available():
        return "cuda", "this GPU's", int(torch.cuda.get_device_properties(0).total_memory)
    if device == "cuda":
        return None
    return "cpu", "this machine's", _physical_memory()


def budget_problem(config: RunConfig, device_type: str, whose: str, total: int) -> str | None:
    """Why the KV cache cannot fit in `total` bytes of memory, or None."""
    page = config.kv_groups(config.resolved_kv_dtype(device_type))[0].page_size_bytes
    blocks = config.num_blocks_for(page)
    need = blocks * page
    if need <= total:
        return None
    return (f"{fmt.count(blocks)} blocks of {config.block_size} tokens take {fmt.size(need)} "
            f"of KV cache, more than {whose} {fmt.size(total)} of memory; choose at most "
            f"{fmt.count(total // page)} blocks")


def _maybe_nvidia() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")


def _physical_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)
