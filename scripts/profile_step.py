"""Where one decode step's time goes: torch.profiler over AR steps of the runtime, per step, by operator.

    python scripts/profile_step.py [--model data/tiny-nld-code] [--prompt-len 100] [--steps 40] [--compile]

Prints wall time per step and the operators with the most self time per step (matmuls, attention, copies, ...).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

import nld_lora
from nld_lora.decoding.api import compiled_backbone
from nld_lora.decoding.batch import DecodeBatch
from nld_lora.decoding.stats import RequestStats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/tiny-nld-code")
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (compiled before timing)")
    args = p.parse_args()
    model = nld_lora.load(args.model)
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    batch = DecodeBatch(model, [prompt.tolist()], [0], [RequestStats()], capacity=args.prompt_len + 4 * args.steps + 8)
    token = torch.tensor([[5]], device=model.device)

    def step() -> None:
        batch.forward(token, "ar")
        batch.advance([1])

    with torch.no_grad(), compiled_backbone(model, args.compile):
        batch.prefill()
        for _ in range(args.steps):  # warm-up (and compilation)
            step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - t0) / args.steps
        with profile() as prof:
            for _ in range(args.steps):
                step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
    print(f"model {args.model}, prompt {args.prompt_len} tokens, {'compiled' if args.compile else 'eager'}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"wall per AR step {1e3 * wall:.3f} ms; profiled self time per step {total:.3f} ms")
    print(f"{'operator':>55} {'ms/step':>8} {'calls/step':>10}")
    for e in events[:args.top]:
        print(f"{e.key[:55]:>55} {e.self_cpu_time_total / args.steps / 1e3:>8.3f} {e.count / args.steps:>10.1f}")


if __name__ == "__main__":
    main()
