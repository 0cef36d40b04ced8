"""Cross-check this runtime against NVIDIA's own `linear_spec_generate` on a release-layout folder.

NVIDIA's remote code needs its own environment (transformers 5.0-5.16: from 5.17 its `_crop_dynamic_cache` hits a
deprecated `DynamicCache.crop` path that 5.24 rejects), so the check runs in two steps:

  # 1. in NVIDIA's environment (imports torch, transformers, peft only; never nld_lora)
  python scripts/cross_check_nvidia.py run FOLDER [--adapter FOLDER/linear_spec_lora] --out nvidia.json
  # 2. in this project's environment: the same prompts through nld_lora, token for token and forward for forward
  python scripts/cross_check_nvidia.py compare FOLDER nvidia.json

FOLDER: a release folder, or `nld-lora export --release-layout FOLDER --adapter A` plus NVIDIA's three remote-code
files copied from the release repository. Greedy, batch 1, the full block (draft length block_size - 1), fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts" / "code_eval.jsonl"


def _prompts(path: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r.get("prompt") or r.get("text") for r in rows[:n]]


def run_nvidia(folder: str, adapter: str | None, prompts: list[str], max_new_tokens: int, out: str) -> None:
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    if adapter:
        from peft import PeftModel

        PeftModel.from_pretrained(model, adapter)  # injects LoRA layers; NVIDIA's code toggles them per phase
    tok = AutoTokenizer.from_pretrained(folder)
    eos = model.config.eos_token_id
    rows = []
    for text in prompts:
        ids = tok(text)["input_ids"]
        output, nfe = model.linear_spec_generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                                 block_length=model.config.block_size, eos_token_id=eos)
        rows.append({"prompt_ids": ids, "tokens": output[0, len(ids):].tolist(), "nfe": int(nfe)})
    Path(out).write_text(json.dumps({"transformers": transformers.__version__, "adapter": adapter,
                                     "max_new_tokens": max_new_tokens, "rows": rows}) + "\n")
    print(f"{len(rows)} prompts decoded by NVIDIA's linear_spec_generate -> {out}")


def compare(folder: str, nvidia_json: str) -> int:
    import nld_lora

    found = json.loads(Path(nvidia_json).read_text())
    model = nld_lora.load(folder, dtype="float32")
    if found["adapter"]:
        model.attach_adapter(found["adapter"])
    rows = found["rows"]
    res = model.generate([r["prompt_ids"] for r in rows], mode="self_spec", max_new_tokens=found["max_new_tokens"],
                         draft_len=model.block_size - 1, batch_size=1, add_special_tokens=False)
    equal = forwards_equal = 0
    for r, ours, st in zip(rows, res.sequences, res.stats.requests):
        n = min(len(ours), len(r["tokens"]))  # NVIDIA's loop may run past max_new_tokens within its last block
        same = ours[:n] == r["tokens"][:n]
        equal += same
        forwards_equal += st.total_forwards == r["nfe"]
        print(f"prompt of {len(r['prompt_ids']):4d} tokens: tokens {'equal' if same else 'DIFFER'} ({n} compared), "
              f"forwards nvidia {r['nfe']} / nld_lora {st.total_forwards}")
    print(f"tokens equal on {equal}/{len(rows)} prompts, forward counts equal on {forwards_equal}/{len(rows)} "
          f"(NVIDIA's transformers {found['transformers']}, adapter {found['adapter'] or 'none'})")
    return 0 if equal == len(rows) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    r = sub.add_parser("run", help="decode with NVIDIA's code (its own environment)")
    r.add_argument("folder")
    r.add_argument("--adapter", default=None, help="PEFT folder, e.g. FOLDER/linear_spec_lora")
    r.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    r.add_argument("--n", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=48)
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="decode the same prompts with nld_lora and compare")
    c.add_argument("folder")
    c.add_argument("nvidia_json")
    args = p.parse_args(argv)
    if args.step == "run":
        run_nvidia(args.folder, args.adapter, _prompts(args.prompts, args.n), args.max_new_tokens, args.out)
        return 0
    return compare(args.folder, args.nvidia_json)


if __name__ == "__main__":
    sys.exit(main())
