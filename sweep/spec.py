"""A sweep's definition: a base RunConfig, axes of values, and the points they expand to.

An axis names a RunConfig field (`block_size`), a nested one (`workload.num_requests`,
`sampling.temperature`) or an alias (`kv_budget` for `kv_budget_bytes`, sizes like 4MiB).
Values are parsed to the field's type from its annotation, so a field added to RunConfig later
(a retention policy, say) is sweepable without changes here; a field whose type is not a
plain scalar takes JSON values (`--axis 'policy=[{"kind": "full"}, {"kind": "h2o"}]'`).

Checks happen before anything runs: an unknown axis, or a value that is invalid on the base
config by itself, is a `SweepError`. A point whose values are only invalid together (block size
8 with 8 blocks for a 128-token context) is kept, with its ConfigError, and recorded as a
failed point.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from dataclasses import dataclass
from typing import Any

from engine.config import ConfigError, RunConfig, SamplingConfig, WorkloadSpec, parse_bytes

ALIASES = {"kv_budget": "kv_budget_bytes", "prefix_caching": "enable_prefix_caching"}
# One of a pair of alternatives: an axis over one clears the other in the base config.
ALTERNATIVES = {"num_blocks": "kv_budget_bytes", "kv_budget_bytes": "num_blocks"}
_NESTED = {"workload": WorkloadSpec, "sampling": SamplingConfig}
_TRUE, _FALSE = {"true", "on", "yes", "1"}, {"false", "off", "no", "0"}


class SweepError(ValueError):
    """Bad sweep input: one line naming the problem and the fix (the CLI exits 2)."""


def field_types() -> dict[str, str]:
    """Sweepable field path -> its annotation ('int', 'int | None', ...)."""
    types: dict[str, str] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in _NESTED:
            types.update({f"{f.name}.{g.name}": str(g.type)
                          for g in dataclasses.fields(_NESTED[f.name])})
        else:
            types[f.name] = str(f.type)
    return types


def axis_field(name: str) -> str:
    """The RunConfig field path an axis name sets, or a SweepError naming the known ones."""
    path = ALIASES.get(name, name)
    if path not in field_types():
        known = ", ".join([*sorted(ALIASES), *sorted(field_types())])
        raise SweepError(f"axis {name!r} is not a RunConfig setting; use one of {known}")
    return path


def parse_value(name: str, text: str) -> Any:
    """One axis value from text, by the type of the field the axis sets."""
    path = axis_field(name)
    kind = field_types()[path]
    raw = text.strip()
    if "| None" in kind and raw.lower() in ("none", "null", ""):
        return None
    base = kind.replace(" | None", "")
    try:
        if path == "kv_budget_bytes":
            return parse_bytes(raw)
        if base == "int":
            return int(raw)
        if base == "float":
            return float(raw)
        if base == "bool":
            if raw.lower() not in _TRUE | _FALSE:
                raise ValueError("not a boolean")
            return raw.lower() in _TRUE
        if base == "str":
            return raw
        return json.loads(raw)
    except (ValueError, ConfigError) as exc:
        if path == "kv_budget_bytes":
            raise SweepError(f"axis {name}: cannot read {raw!r} as a size; write e.g. "
                             f"{name}=4MiB,16MiB") from exc
        example = {"int": "8,16", "float": "0.5,1.0", "bool": "true,false"}.get(base, "...")
        raise SweepError(f"axis {name}: cannot read {raw!r} as {base} ({exc}); write e.g. "
                         f"{name}={example}") from exc


def format_value(name: str, value: Any) -> str:
    """An axis value for labels: byte budgets in MiB, JSON for structured values."""
    if axis_field(name) == "kv_budget_bytes" and isinstance(value, int):
        return f"{value / 2**20:g}MiB"
    return value if isinstance(value, str) else json.dumps(value)


def point_label(values: dict[str, Any]) -> str:
    """'block_size=8 kv_budget=4MiB' (a run's name, a table cell)."""
    return " ".join(f"{name}={format_value(name, v)}" for name, v in values.items())


@dataclass(slots=True)
class Axis:
    name: str  # as the user wrote it (an alias stays an alias: it labels charts)
    values: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": list(self.values)}


def parse_axis(text: str) -> Axis:
    """'block_size=8,16,32' or 'name=[json, values]' -> Axis (values parsed and checked)."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise SweepError(f"--axis {text!r}: write NAME=V1,V2,... e.g. --axis block_size=8,16,32")
    axis_field(name)
    if rest.strip().startswith("["):
        try:
            items = json.loads(rest)
        except ValueError as exc:
            raise SweepError(f"--axis {name}: the values are not a JSON list ({exc})") from exc
        values = [item if not isinstance(item, str) else parse_value(name, item)
                  for item in items]
    else:
        values = [parse_value(name, item) for item in rest.split(",")]
    if len(values) != len({json.dumps(v, sort_keys=True) for v in values}):
        raise SweepError(f"--axis {name}: a value is repeated; use --repeat to run points again")
    return Axis(name, values)


def config_for(base: RunConfig, values: dict[str, Any]) -> RunConfig:
    """The base config with the axes' values set (a ConfigError if that is not valid)."""
    data = base.to_dict()
    for name, value in values.items():
        path = axis_field(name)
        top, _, sub = path.partition(".")
        if sub:
            data[top][sub] = value
        else:
            data[top] = value
        if path in ALTERNATIVES and value is not None and ALTERNATIVES[path] not in values:
            data[ALTERNATIVES[path]] = None
    return RunConfig.from_dict(data)


@dataclass
class SweepSpec:
    """What a sweep runs: `base` with every combination of `axes` (or a seeded random
    `sample` of them), each `repeat` times."""

    base: RunConfig
    axes: list[Axis]
    repeat: int = 1
    sample: int | None = None
    sample_seed: int = 0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise SweepError("--repeat must be at least 1")
        if self.sample is not None and self.sample < 1:
            raise SweepError("--sample must be at least 1 (or left out for the whole grid)")
        fields = [axis_field(a.name) for a in self.axes]
        if len(set(fields)) != len(fields):
            raise SweepError("two axes set the same setting; merge their values into one axis")
        if {"num_blocks", "kv_budget_bytes"} <= set(fields):
            raise SweepError("num_blocks and kv_budget are alternatives: sweep one of them")
        for axis in self.axes:  # each value must work on the base config by itself
            if not axis.values:
                raise SweepError(f"axis {axis.name} has no values")
            for value in axis.values:
                try:
                    config_for(self.base, {axis.name: value})
                except ConfigError as exc:
                    raise SweepError(f"axis {axis.name}={value}: {exc}") from exc

    @property
    def grid_size(self) -> int:
        size = 1
        for axis in self.axes:
            size *= len(axis.values)
        return size

    @property
    def num_points(self) -> int:
        combos = self.grid_size if self.sample is None else min(self.sample, self.grid_size)
        return combos * self.repeat

    def points(self) -> list[dict[str, Any]]:
        """[{"values": {axis: value}, "repeat": r}] in a fixed order (index = point id)."""
        combos = list(itertools.product(*(a.values for a in self.axes)))
        if self.sample is not None and self.sample < len(combos):
            picked = random.Random(self.sample_seed).sample(range(len(combos)), self.sample)
            combos = [combos[i] for i in sorted(picked)]
        names = [a.name for a in self.axes]
        return [{"values": dict(zip(names, combo, strict=True)), "repeat": r}
                for combo in combos for r in range(self.repeat)]

    def point_configs(self) -> list[RunConfig | ConfigError]:
        """Each point's config, or the ConfigError its combination of values makes."""
        out: list[RunConfig | ConfigError] = []
        for point in self.points():
            try:
                out.append(config_for(self.base, point["values"]))
            except ConfigError as exc:
                out.append(exc)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "axes": [a.to_dict() for a in self.axes],
                "repeat": self.repeat, "sample": self.sample, "sample_seed": self.sample_seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str | None = None) -> SweepSpec:
        """A stored spec (the sweep row's) back; no re-validation of the axis values beyond
        what construction does."""
        return cls(base=RunConfig.from_dict(data["base"]),
                   axes=[Axis(a["name"], list(a["values"])) for a in data["axes"]],
                   repeat=int(data.get("repeat", 1)), sample=data.get("sample"),
                   sample_seed=int(data.get("sample_seed", 0)), name=name)


def load_base(text: str, source: str) -> RunConfig:
    """A RunConfig from its JSON form, any field left out taking its default."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SweepError(f"{source}: not JSON ({exc}); write a RunConfig such as "
                         '{"model": "tiny", "workload": {"kind": "preset", "name": "mixed"}}'
                         ) from exc
    if not isinstance(data, dict):
        raise SweepError(f"{source}: a RunConfig is a JSON object, not {type(data).__name__}")
    try:
        return RunConfig.from_dict(data)
    except ConfigError as exc:
        raise SweepError(f"{source}: {exc}") from exc
    except TypeError as exc:  # e.g. an unknown key inside "workload"
        raise SweepError(f"{source}: {exc}") from exc
