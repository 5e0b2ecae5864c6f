#!/usr/bin/env bash
# Verify the GPU path on a machine with a CUDA GPU, in at most 8 minutes, and print one table:
#   - the tests marked `gpu` (pytest -m gpu);
#   - RDA's step against SGD(fused) and Adam(fused) on CUDA, for resnet18's parameters;
#   - 1-worker resnet18 training throughput on 32x32 generated data, float32 and bf16;
#   - the FFCV-to-GPU loader rate.
# Each section runs in its own process under a time limit (seconds below, 420 in all, each cut
# further so that the whole script ends within 470 s); one that fails or runs out of time gets
# a row saying so, and the others still run. The sections themselves are in
# benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [RESULTS_DIR]      # from anywhere; PYTHON=... to pick the interpreter
#
# RESULTS_DIR (default: a new temporary directory, printed at the end) keeps each section's log.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$OUT"
STARTED=$(date +%s)
DEADLINE=$((STARTED + 470))

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device here; this script checks the GPU path" >&2
    exit 2
fi

# section NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds, and never past the
# deadline less 20 s (a killed section's 5 s of grace, and the table); keep its log and status.
section() {
    local name=$1 limit=$2 left
    shift 2
    left=$((DEADLINE - 20 - $(date +%s)))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 0 ]; then return; fi
    echo "$limit" > "$OUT/$name.limit"
    echo "gpu_check: $name (at most ${limit} s) ..." >&2
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo $? > "$OUT/$name.rc"
}

section tests 80 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests
section optimizer 120 "$PYTHON" benchmarks/gpu_check.py optimizer --out "$OUT/optimizer.json"
section loader 45 "$PYTHON" benchmarks/gpu_check.py loader --out "$OUT/loader.json" \
    --data "$OUT/data" --cache "$OUT/cache"
section train 175 "$PYTHON" benchmarks/gpu_check.py train --out "$OUT/train.json" \
    --data "$OUT/data" --cache "$OUT/cache"

"$PYTHON" benchmarks/gpu_check.py table "$OUT"
echo
echo "$(( $(date +%s) - STARTED )) s in all; logs in $OUT"
