#!/usr/bin/env bash
# Install (CPU torch first when no GPU is present) and run the test suite. README's test command calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[test]"
bash scripts/install_sandbox.sh
export TRITON_INTERPRET=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
python -m ruff check nld_lora recipes scripts tests
python -m pytest tests "$@"
