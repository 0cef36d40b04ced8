"""Measure the embedded tiny base for its model card: held-out AR loss, denoising accuracy, native acceptance.

Acceptance is also given in bytes per draft cycle (acceptance length x UTF-8 bytes per generated token), the unit
that compares a BPE model with a byte-level one.

    python scripts/eval_tiny.py [--model data/tiny-nld-code] [--corpus .cache/corpus] [--n 200]

Needs the held-out corpus from `python scripts/make_domain_data.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import nld_lora
from nld_lora.data.readers import read_prompts
from nld_lora.decoding.api import max_prompt_tokens
from nld_lora.decoding.stats import safe_ratio
from nld_lora.pretrain import evaluate_base
from nld_lora.pretrain.corpus import bytes_per_token, pack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/tiny-nld-code")
    p.add_argument("--corpus", default=".cache/corpus")
    p.add_argument("--prompts", default="data/prompts/code_eval.jsonl")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()
    torch.manual_seed(0)
    model = nld_lora.load(args.model)
    tok = model.tokenizer
    held = Path(args.corpus) / "corpus_eval.txt"
    rows = pack(tok, held, 256)
    metrics = evaluate_base(model, rows, bytes_per_token(tok, held), model.block_size)
    budget = max_prompt_tokens(model, "self_spec", args.max_new_tokens)
    prompts, skipped = [], 0
    for record in read_prompts(args.prompts)[0]:
        if len(prompts) == args.n:
            break
        if len(tok(record.prompt)["input_ids"]) <= budget:
            prompts.append(record.prompt)
        else:
            skipped += 1
    if skipped:
        print(f"skipped {skipped} prompts too long for {model.max_positions} positions with {args.max_new_tokens} new tokens")
    res = model.generate(prompts, mode="self_spec", max_new_tokens=args.max_new_tokens, batch_size=16)
    generated_bytes = sum(len(continuation.encode("utf-8")) for continuation in res.texts)
    generated_bytes_per_token = safe_ratio(generated_bytes, res.stats.new_tokens)
    metrics["native_self_spec"] = {"block_size": model.block_size, "prompts": len(prompts),
                                   "acceptance_length": res.stats.acceptance_length, "tpf": res.stats.tpf,
                                   "generated_bytes_per_token": generated_bytes_per_token,
                                   "bytes_per_cycle": res.stats.acceptance_length * generated_bytes_per_token}
    ar = model.generate(prompts[:3], mode="ar", max_new_tokens=64)
    print(json.dumps(metrics, indent=2))
    for prompt, cont in zip(prompts[:3], ar.texts):
        print(f"\n--- prompt ---\n{prompt}\n--- AR continuation ---\n{cont}")


if __name__ == "__main__":
    main()
