#!/usr/bin/env bash
# Train variants of the embedded base concurrently on one GPU. Each variant is a name and its pretrain_tiny.py
# arguments; variants without --vocab reuse the shipped tokenizer. Writes <dest>/sweep.tgz (each variant's config,
# tokenizer, metrics, logs) and <dest>/<name>.safetensors (weights rounded to bf16 to fit the device tool's transfer
# limits). Usage (needs .cache/corpus from scripts/make_domain_data.py):
#   bash scripts/pretrain_sweep.sh DEST NAME "ARGS" [NAME "ARGS" ...]
# A variant becomes a loadable model folder again with
#   tar -xzf DEST/sweep.tgz -C DIR && cp DEST/NAME.safetensors DIR/NAME/model/model.safetensors
# (nld_lora.load casts the bf16 weights to the config's fp32).
set -uo pipefail
DEST=${1:?destination folder}
shift
WORK=${SWEEP_WORK:-/tmp/pretrain_sweep}
mkdir -p "$DEST" "$WORK"

variant() {
  local name=$1 args=$2
  mkdir -p "$WORK/$name/work/tokenizer"
  if [[ "$args" != *--vocab* ]]; then
    cp data/tiny-nld-code/tokenizer.json data/tiny-nld-code/tokenizer_config.json "$WORK/$name/work/tokenizer/"
  fi
  # shellcheck disable=SC2086
  python scripts/pretrain_tiny.py --work "$WORK/$name/work" --out "$WORK/$name/model" --ckpt-every 1000 $args \
    > "$WORK/$name/train.log" 2>&1
  echo "$name exit $?"
}

while [ $# -ge 2 ]; do
  variant "$1" "$2" &
  shift 2
done
wait

python - "$WORK" "$DEST" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

work, dest = Path(sys.argv[1]), Path(sys.argv[2])
for model in sorted(work.glob("*/model")):
    if (model / "model.safetensors").exists():
        weights = load_file(str(model / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(dest / f"{model.parent.name}.safetensors"),
                  metadata={"format": "pt"})
PY
tar -czf "$DEST/sweep.tgz" -C "$WORK" --exclude='*.safetensors' --exclude='state.pt*' .
ls -la "$DEST"
