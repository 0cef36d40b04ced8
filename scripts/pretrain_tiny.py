"""Pretrain the embedded tiny tri-mode base (tokenizer + Ministral3 model) with NLD's two-stage recipe.

Stage 1: AR only. Stage 2: joint AR + alpha * diffusion (alpha 0.3) over the dual-stream layout.
bf16 autocast, sequence packing, fixed seed, periodic checkpoints, exact resume.
Run `python scripts/make_domain_data.py` first (it writes the corpus).

On a GPU the defaults are the shipped model's schedule (1200 + 1600 steps of 16 x 512 tokens; 76 s on an H200).
On a CPU without explicit step counts the run is a 60-minute wall-clock budget instead (--minutes), 40% of it AR.
"""

from __future__ import annotations

import argparse
import json

import torch

from nld_lora.pretrain import PretrainConfig, pretrain
from nld_lora.pretrain.config import CPU_MINUTES, DEFAULT_STEPS


def main() -> None:
    d = PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--corpus", default=d.corpus)
    p.add_argument("--out", default=d.out)
    p.add_argument("--work", default=d.work, help="checkpoints for resume")
    for name in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "max_positions", "seq_len",
                 "batch", "block_size", "warmup", "ckpt_every", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ar-steps", type=int, default=None, help=f"stage 1 steps (default {DEFAULT_STEPS[0]})")
    p.add_argument("--joint-steps", type=int, default=None, help=f"stage 2 steps (default {DEFAULT_STEPS[1]})")
    p.add_argument("--minutes", type=float, default=None,
                   help="train for this wall-clock budget instead of fixed step counts (the counts reached are saved "
                        f"in pretrain_metrics.json, so the run can be repeated by steps); default {CPU_MINUTES} on a "
                        "CPU when no step counts are given")
    p.add_argument("--ar-fraction", type=float, default=d.ar_fraction, help="share of --minutes spent in stage 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-autocast", action="store_true", help="train in fp32")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="end early, leaving a checkpoint in --work that a later run with the same settings resumes")
    args = vars(p.parse_args())
    if args["minutes"] is None and args["ar_steps"] is None and args["joint_steps"] is None \
            and args["device"] == "cpu":
        args["minutes"] = CPU_MINUTES
    args["ar_steps"] = DEFAULT_STEPS[0] if args["ar_steps"] is None else args["ar_steps"]
    args["joint_steps"] = DEFAULT_STEPS[1] if args["joint_steps"] is None else args["joint_steps"]
    args["autocast"] = not args.pop("no_autocast")
    metrics = pretrain(PretrainConfig(**args))
    print(json.dumps({k: v for k, v in metrics.items() if k != "args"}, indent=2))


if __name__ == "__main__":
    main()
