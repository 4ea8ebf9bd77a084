"""engine/__init__.py caps PyTorch's OpenMP spin before torch loads, for the entry points that
import the engine first, and never overrides a value the environment sets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = "import os, sys; {imports}; print(os.environ.get('GOMP_SPINCOUNT'))"


def spin_after(imports: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | env
    done = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], cwd=ROOT,
                          env=clean, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_cli_imports_the_engine_before_torch():
    assert spin_after("import cli; cli.build_parser()") == "20000"


def test_a_value_in_the_environment_is_kept():
    assert spin_after("import engine", GOMP_SPINCOUNT="5") == "5"


def test_after_torch_it_changes_nothing():
    assert spin_after("import torch; import engine") == "None"
