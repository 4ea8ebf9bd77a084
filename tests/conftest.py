"""Shared fixtures: the real SmolLM2 (loaded once per session), its transformers oracle, and a
tiny random Llama for fast tests.

The oracle is transformers' own GGUF conversion. Converting takes ~30-60 s on a 2-core CPU, so
its converted weights and config are saved under $KVLAB_CACHE_DIR and later sessions load that
copy in a few seconds (it is still transformers' conversion, not ours).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.cache_files import atomic_write, cache_dir  # noqa: E402
from engine.models.gguf_loader import GGUF_FILE, cache_key, gguf_path  # noqa: E402
from engine.models.loader import LoadedModel, load_model  # noqa: E402
from engine.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

torch.set_num_threads(2)  # the CI machine has 2 cores; more threads only contend


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct, fp32 on CPU. Shared: never mutate its weights."""
    return load_model("smollm2", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    """TINY_LLAMA with seed-0 random weights, fp32 on CPU."""
    return load_model("tiny", torch.device("cpu"), torch.float32, seed=0)


@pytest.fixture(scope="session")
def hf_oracle():
    """transformers' LlamaForCausalLM converted from the same GGUF, fp32, eval mode."""
    from safetensors.torch import load_model as load_weights
    from safetensors.torch import save_model as save_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = gguf_path()
    weights = cache_dir() / f"hf-oracle-{cache_key(path)}.safetensors"
    config_file = weights.with_suffix(".json")
    if weights.is_file() and config_file.is_file():
        config = AutoConfig.from_pretrained(config_file)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        load_weights(model, str(weights))
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=GGUF_FILE,
                                                 dtype=torch.float32)
    # save_pretrained refuses GGUF-"quantized" models; its weights are plain fp32 tensors
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    atomic_write(config_file, lambda tmp: Path(tmp).write_text(json.dumps(config)))
    atomic_write(weights, lambda tmp: save_weights(model, tmp))
    return model.eval()


# Eight chat prompts of different lengths; their transformers greedy continuations are the
# reference for the model tests (through the runner) and the engine tests (through the scheduler).
ORACLE_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each is prime.",
    "hi",
    "Explain, in two sentences, what a KV cache is and why inference engines page it into "
    "fixed-size blocks instead of one contiguous buffer per request.",
    "Translate 'good morning' into Spanish, French and German.",
    "What is 17 * 23? Show your working step by step, please.",
    "Tell me a short joke about computers and programmers, please.",
]
ORACLE_NEW_TOKENS = 32


@pytest.fixture(scope="session")
def oracle_prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}])
            for q in ORACLE_QUESTIONS]


@pytest.fixture(scope="session")
def oracle_expected(hf_oracle, oracle_prompts) -> list[list[int]]:
    """transformers' raw greedy continuation (ORACLE_NEW_TOKENS tokens) of each prompt."""
    from oracle import hf_greedy

    return [hf_greedy(hf_oracle, p, ORACLE_NEW_TOKENS) for p in oracle_prompts]


@pytest.fixture(scope="session")
def hf_tokenizer():
    """transformers' tokenizer converted from the same GGUF (the tokenizer tests' oracle)."""
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=GGUF_FILE)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty SQLite store that the dashboard pages under test also open (via KVLAB_DB_URL).
    The store tests define their own `store` (parametrised over SQLite and PostgreSQL)."""
    from store import open_store

    url = f"sqlite:///{tmp_path / 'kvlab.db'}"
    monkeypatch.setenv("KVLAB_DB_URL", url)
    return open_store(url)


@pytest.fixture
def fresh_cpu_library(monkeypatch, tmp_path):
    """The CPU kernels' library (engine/cpu) with a state and build cache of the test's own;
    the process-wide state is restored after (the next call loads it again)."""
    from engine.cpu import library

    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    library.reset()
    yield library
    library.reset()


# Fuzz case counts (tests/test_fuzz_inputs.py): printed at the end of every pytest run and
# written to artifacts/fuzz-counts.json, the figure README's "Reliability" section states.
FUZZ_COUNTS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="session")
def fuzz_counts() -> collections.Counter[str]:
    return FUZZ_COUNTS


def pytest_terminal_summary(terminalreporter) -> None:
    if not FUZZ_COUNTS:
        return
    terminalreporter.section("fuzz cases tried")
    for name in ("workload parser", "trace importer"):
        total = FUZZ_COUNTS[name]
        if total:
            terminalreporter.write_line(
                f"{name}: {total} cases ({FUZZ_COUNTS[name + ' accepted']} accepted, "
                f"{FUZZ_COUNTS[name + ' refused']} refused with a one-line error)")
    for key in sorted(k for k in FUZZ_COUNTS if ": " in k):
        terminalreporter.write_line(f"  {key}: {FUZZ_COUNTS[key]}")
    out = ROOT / "artifacts" / "fuzz-counts.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(dict(sorted(FUZZ_COUNTS.items())), indent=1) + "\n")
