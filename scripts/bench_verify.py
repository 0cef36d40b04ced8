"""Benchmark the fused verify kernels against the PyTorch reference and a naive softmax-then-argmax path.

GPU only: for V in {32000, 131072}, rows in {32, 256, 2048}, bf16; prints time per call and achieved GB/s
(logits bytes read once) against the card's peak. On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0}


def _bench(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def naive_greedy(logits, drafts):
    """What a straightforward implementation does: materialise softmax, argmax, compare on the host."""
    probs = logits.float().softmax(-1)
    am = probs.argmax(-1)
    return am.cpu(), drafts.cpu()


def bench_case(vocab: int, rows: int, iters: int, peak: float | None) -> None:
    """One table block: greedy and sampled kernel vs reference and naive, k = 31 drafts per request."""
    from nld_lora.kernels import reference, triton_verify

    k = 31
    n = rows // (k + 1)
    cu = torch.arange(n + 1, device="cuda", dtype=torch.int32) * k
    logits = torch.randn(n * (k + 1), vocab, device="cuda", dtype=torch.bfloat16)
    drafts = logits.argmax(-1).view(n, k + 1)[:, :k].reshape(-1).contiguous()
    dl = torch.randn(n * k, vocab, device="cuda", dtype=torch.bfloat16)
    temps = torch.ones(n, device="cuda")
    seeds = torch.arange(n, device="cuda")
    t_ref = _bench(lambda: reference.verify_greedy(logits, drafts, cu), iters)
    t_naive = _bench(lambda: naive_greedy(logits, drafts), iters)
    t_ref_sampled = _bench(lambda: reference.verify_sampled(logits, dl, drafts, cu, temps, seeds), max(iters // 10, 2))
    cases = {
        "greedy": (lambda: triton_verify.verify_greedy(logits, drafts, cu), logits.numel() * 2, t_ref),
        "sampled": (lambda: triton_verify.verify_sampled(logits, dl, drafts, cu, temps, seeds),
                    (logits.numel() + dl.numel()) * 2, t_ref_sampled),
    }
    for label, (fn, moved, t_base) in cases.items():
        ms = _bench(fn, iters)
        gbps = moved / ms / 1e6
        pct = f"{100 * gbps / peak:.0f}" if peak else "?"
        print(f"{vocab:>7} {rows:>5} {label:>10} {ms:>8.3f} {gbps:>8.0f} {pct:>6} {t_base / ms:>6.1f}x "
              f"{t_naive / ms:>7.1f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_verify: no CUDA GPU on this machine; nothing to benchmark (exit 0).")
        return 0
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    print(f"device: {name} (peak {peak or '?'} GB/s)")
    print(f"{'V':>7} {'rows':>5} {'kernel':>10} {'ms':>8} {'GB/s':>8} {'%peak':>6} {'vs ref':>7} {'vs naive':>8}")
    for vocab in (32000, 131072):
        for rows in (32, 256, 2048):
            bench_case(vocab, rows, args.iters, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
