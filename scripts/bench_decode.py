"""Decode benchmark: per mode, at batch 1 and batch 8, TPF, mean acceptance, tokens/s and speedup over AR.

    python scripts/bench_decode.py [--model data/tiny-nld-code] [--adapter DIR] [--prompts FILE] [--n 32]

All modes run in the same process on the same prompts, so the speedup column compares like with like.
"""

from __future__ import annotations

import argparse
import platform

import torch

import nld_lora
from nld_lora.data.readers import read_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/tiny-nld-code")
    p.add_argument("--adapter", default=None, help="adds a self_spec+adapter row")
    p.add_argument("--prompts", default="data/prompts/code_eval.jsonl")
    p.add_argument("--n", type=int, default=32, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    args = p.parse_args()
    model = nld_lora.load(args.model, device=args.device, dtype=args.dtype)
    records, _ = read_prompts(args.prompts, limit=args.n)
    prompts = [r.prompt for r in records]
    rows = [("ar", {"mode": "ar"}), ("diffusion", {"mode": "diffusion"}), ("self_spec", {"mode": "self_spec"})]
    if args.adapter:
        model.attach_adapter(args.adapter)
        rows.append(("self_spec+lora", {"mode": "self_spec", "adapter": model.active_adapter}))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"model {args.model}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'mode':>15} {'TPF':>7} {'accept':>7} {'tok/s':>9} {'vs AR':>7}")
    model.generate(prompts[:2], mode="self_spec", max_new_tokens=8, adapter=False)  # warm-up
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        ar_speed = None
        for label, kw in rows:
            kw = {"adapter": False, **kw}
            res = model.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=bs, **kw)
            st = res.stats
            ar_speed = ar_speed or st.tokens_per_s
            acc = f"{st.acceptance_length:.2f}" if kw["mode"] == "self_spec" else "-"
            print(f"{bs:>5} {label:>15} {st.tpf:>7.3f} {acc:>7} {st.tokens_per_s:>9.1f} "
                  f"{st.tokens_per_s / ar_speed:>6.2f}x")


if __name__ == "__main__":
    main()
