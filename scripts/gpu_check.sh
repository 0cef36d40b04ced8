#!/usr/bin/env bash
# One-shot GPU check (device tool): compiled Triton kernels vs the references, then both benchmarks.
# Usage on the GPU machine, from the repo root: bash scripts/gpu_check.sh  (writes logs to $OUT when set)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python -m pip install -q -e ".[test]" 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.txt" | tail -5
python scripts/bench_verify.py 2>&1 | tee "$OUT/bench_verify.txt"
python scripts/bench_decode.py --device cuda --n 32 2>&1 | tee "$OUT/bench_decode.txt"
