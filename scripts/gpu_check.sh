#!/usr/bin/env bash
# One-shot GPU check (device tool): compiled Triton kernels vs the references, then both benchmarks.
# Usage on the GPU machine, from the repo root: bash scripts/gpu_check.sh  (writes $OUT/gpu_check.log when OUT is set)
# Runs from the source tree (PYTHONPATH), so a machine without network access needs only its own packages.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$LOG"
echo "== kernel tests (compiled, TRITON_INTERPRET=0) ==" | tee -a "$LOG"
TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py -q -p no:cacheprovider 2>&1 | tail -15 | tee -a "$LOG"
echo "== bench_verify ==" | tee -a "$LOG"
python scripts/bench_verify.py 2>&1 | tee -a "$LOG"
echo "== bench_decode ==" | tee -a "$LOG"
ADAPTER=runs/tiny_code/train/linear_spec_lora  # the default recipe's adapter, when carried along
ADAPTER_ARGS=()
[ -d "$ADAPTER" ] && ADAPTER_ARGS=(--adapter "$ADAPTER")
python scripts/bench_decode.py --device cuda --n 32 --compile-batches 1,8 --compile-mode reduce-overhead \
  "${ADAPTER_ARGS[@]}" 2>&1 | tee -a "$LOG"
echo "== compiled decode (CUDA graphs) stays lossless ==" | tee -a "$LOG"
python - <<'PY' 2>&1 | tail -3 | tee -a "$LOG"
import nld_lora
m = nld_lora.load("data/tiny-nld-code", device="cuda")
p = ["def add(a, b):\n", "class Stack:\n    def push(self, item):\n"]
ar = m.generate(p, mode="ar", max_new_tokens=48)
for mode in ("self_spec", "self_spec_quadratic"):
    r = m.generate(p, mode=mode, max_new_tokens=48, compile="reduce-overhead", draft_len="auto", ngram=3)
    print(mode, "equal to AR:", r.sequences == ar.sequences, "choices", r.stats.draft_len_choices)
PY
echo "== scale_check 8b (bf16 + 4-bit QLoRA) ==" | tee -a "$LOG"
python scripts/scale_check.py --shape 8b --qlora --workdir /tmp/nld_scale_check --out "$OUT/scale_8b.json" 2>&1 | tail -6 | tee -a "$LOG"
echo "== vLLM collection backend vs the runtime (fp32 targets) ==" | tee -a "$LOG"
if python -c "import vllm" >/dev/null 2>&1; then
  NLD_VLLM_REPORT="$OUT/vllm_vs_runtime.json" python -m pytest tests/test_vllm_backend.py -p no:cacheprovider -rs 2>&1 | tail -5 | tee -a "$LOG"
  cat "$OUT/vllm_vs_runtime.json" 2>/dev/null | tee -a "$LOG"
else
  echo "vLLM is not installed on this machine: skipped (scripts/check_vllm_cpu.sh runs it on CPU)" | tee -a "$LOG"
fi
