"""Sweep specs: axes parsed to their fields' types, checked before anything runs, expanded to
points (grid, seeded sample, repeats)."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, RunConfig, WorkloadSpec
from sweep.spec import (
    Axis,
    SweepError,
    SweepSpec,
    config_for,
    load_base,
    parse_axis,
    point_label,
)

BASE = RunConfig(model="tiny", device="cpu", max_model_len=128,
                 workload=WorkloadSpec(kind="preset", name="mixed"))


@pytest.mark.parametrize(("text", "name", "values"), [
    ("block_size=8,16,32", "block_size", [8, 16, 32]),
    ("kv_budget=4MiB, 1.5MiB", "kv_budget", [4 * 2**20, int(1.5 * 2**20)]),
    ("enable_prefix_caching=on,false", "enable_prefix_caching", [True, False]),
    ("prefix_caching=true,no", "prefix_caching", [True, False]),
    ("max_model_len=none,64", "max_model_len", [None, 64]),
    ("kv_dtype=auto,fp32", "kv_dtype", ["auto", "fp32"]),
    ("workload.num_requests=2,4", "workload.num_requests", [2, 4]),
    ("sampling.temperature=0,0.7", "sampling.temperature", [0.0, 0.7]),
    ('workload.name=["mixed", "chat"]', "workload.name", ["mixed", "chat"]),
])
def test_axis_values_are_parsed_to_the_field_type(text, name, values):
    axis = parse_axis(text)
    assert (axis.name, axis.values) == (name, values)


@pytest.mark.parametrize(("text", "needle"), [
    ("blok_size=8", "not a RunConfig setting"),
    ("block_size", "NAME=V1,V2"),
    ("block_size=8,x", "cannot read 'x' as int"),
    ("kv_budget=lots", "write e.g. kv_budget=4MiB"),
    ("enable_prefix_caching=maybe", "as bool"),
    ("block_size=8,8", "repeated"),
    ("block_size=[8, ", "not a JSON list"),
])
def test_bad_axes_are_refused_with_the_fix(text, needle):
    with pytest.raises(SweepError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        parse_axis(text)


def test_a_value_invalid_on_its_own_is_refused_before_anything_runs():
    with pytest.raises(SweepError, match="block_size=24: block_size: 24 is not a power of two"):
        SweepSpec(BASE, [parse_axis("block_size=16,24")])
    with pytest.raises(SweepError, match="alternatives"):
        SweepSpec(BASE, [parse_axis("num_blocks=8"), parse_axis("kv_budget=1MiB")])
    with pytest.raises(SweepError, match="same setting"):
        SweepSpec(BASE, [parse_axis("kv_budget=1MiB"), parse_axis("kv_budget_bytes=2MiB")])


def test_a_combination_that_is_invalid_only_together_becomes_a_failed_point():
    spec = SweepSpec(BASE, [parse_axis("block_size=8,16"), parse_axis("num_blocks=8,32")])
    configs = spec.point_configs()
    assert isinstance(configs[0], ConfigError) and "needs 16" in str(configs[0])
    assert [(c.block_size, c.num_blocks) for c in configs[1:]] == [(8, 32), (16, 8), (16, 32)]


def test_a_budget_axis_replaces_the_base_block_count():
    base = BASE.replace(num_blocks=64)
    config = config_for(base, {"kv_budget": 2**20})
    assert (config.num_blocks, config.kv_budget_bytes) == (None, 2**20)
    assert config_for(BASE.replace(kv_budget_bytes=2**20), {"num_blocks": 16}).num_blocks == 16


def test_points_grid_repeat_and_seeded_sample():
    axes = [parse_axis("block_size=8,16"), parse_axis("max_num_seqs=2,4,8")]
    grid = SweepSpec(BASE, axes, repeat=2)
    points = grid.points()
    assert grid.num_points == len(points) == 12
    assert points[0] == {"values": {"block_size": 8, "max_num_seqs": 2}, "repeat": 0}
    assert points[1] == {"values": {"block_size": 8, "max_num_seqs": 2}, "repeat": 1}
    sample = SweepSpec(BASE, axes, sample=3, sample_seed=7)
    assert sample.num_points == 3
    assert sample.points() == SweepSpec(BASE, axes, sample=3, sample_seed=7).points()
    others = {str(SweepSpec(BASE, axes, sample=3, sample_seed=s).points()) for s in range(5)}
    assert len(others) > 1  # the seed picks the sample
    assert SweepSpec(BASE, axes, sample=100).num_points == 6  # more than the grid: the grid


def test_spec_round_trips_through_its_stored_form():
    spec = SweepSpec(BASE, [parse_axis("kv_budget=1MiB,2MiB"), parse_axis("seed=0,1")],
                     repeat=2, sample=3, sample_seed=5)
    back = SweepSpec.from_dict(spec.to_dict())
    assert back.points() == spec.points()
    assert back.base == spec.base


def test_base_config_may_leave_fields_out_and_is_checked():
    base = load_base('{"model": "tiny", "workload": {"kind": "preset", "name": "mixed"}}', "x")
    assert base.block_size == 16 and base.workload.name == "mixed"
    with pytest.raises(SweepError, match="x: not JSON"):
        load_base("{", "x")
    with pytest.raises(SweepError, match="x: block_size"):
        load_base('{"block_size": 3}', "x")
    with pytest.raises(SweepError, match="unexpected keyword"):
        load_base('{"workload": {"nme": "mixed"}}', "x")


def test_point_labels_read_like_the_command_line():
    assert point_label({"block_size": 8, "kv_budget": 4 * 2**20}) == "block_size=8 kv_budget=4MiB"
    assert Axis("seed", [1]).to_dict() == {"name": "seed", "values": [1]}
