"""RunConfig validation and JSON round trip."""

import pytest

from engine.config import ConfigError, RunConfig, SamplingConfig, WorkloadSpec, parse_bytes


def test_json_round_trip_keeps_every_field():
    config = RunConfig(
        model="tiny", block_size=32, num_blocks=64, enable_prefix_caching=False,
        max_num_seqs=4, max_num_batched_tokens=128, max_model_len=256, seed=7,
        sampling=SamplingConfig(temperature=0.7, top_p=0.9, top_k=20),
        workload=WorkloadSpec(kind="synthetic", num_requests=5, arrival_rate=2.0),
    )
    assert RunConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("block_size", [0, 3, 24, 100])
def test_block_size_must_be_a_power_of_two(block_size):
    with pytest.raises(ConfigError, match="power of two") as info:
        RunConfig(model="tiny", block_size=block_size)
    assert info.value.field == "block_size"


def test_budget_too_small_for_one_request_says_needed_and_given_blocks():
    with pytest.raises(ConfigError) as info:
        RunConfig(model="smollm2", num_blocks=10, max_model_len=512)
    message = str(info.value)
    assert "10 blocks" in message and "needs 32" in message and "max_model_len" in message


def test_byte_budget_is_turned_into_blocks():
    # SmolLM2 fp32: 2 (K,V) x 30 layers x 3 heads x 64 dims x 4 bytes = 46080 bytes per token.
    config = RunConfig(model="smollm2", kv_budget_bytes=parse_bytes("64MiB"), max_model_len=1024)
    assert config.kv_bytes_per_block == 16 * 46080
    assert config.resolved_num_blocks == (64 * 1024**2) // (16 * 46080)


def test_blocks_and_budget_are_exclusive():
    with pytest.raises(ConfigError, match="give one of .* not num_blocks and kv_budget_bytes"):
        RunConfig(model="tiny", num_blocks=64, kv_budget_bytes=1 << 20)
    with pytest.raises(ConfigError, match="kv_memory_fraction"):
        RunConfig(model="tiny", kv_memory_fraction=1.5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64MiB", 64 * 1024**2), ("1.5GiB", int(1.5 * 1024**3)), ("500MB", 500 * 1000**2),
     ("4096", 4096)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ConfigError, match="64MiB"):
        parse_bytes("lots")


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"model": "gpt5"}, "model"), ({"device": "tpu"}, "device"),
     ({"max_num_seqs": 0}, "max_num_seqs"), ({"max_model_len": 10**6}, "max_model_len"),
     ({"max_num_batched_tokens": 2, "max_num_seqs": 4}, "max_num_batched_tokens")],
)
def test_bad_values_name_their_field(changes, field):
    with pytest.raises(ConfigError) as info:
        RunConfig(**{"model": "tiny", **changes})
    assert info.value.field == field


def test_unknown_keys_are_rejected_on_load():
    with pytest.raises(ConfigError, match="unknown setting"):
        RunConfig.from_dict({"model": "tiny", "blok_size": 16})
