"""The ceiling of batch-1 self-speculation on this machine: the fastest any planner could decode, with and without
the adapter, by forward time alone.

For every position of each prompt's AR answer it scores what each kind of cycle would have committed there: an AR
step (one token), prompt-lookup drafts cut to k (the runtime's NgramIndex; one verify forward of width k + 1),
diffusion drafts of length k, and merged cycles whose first c drafts are the lookup's and the rest diffusion drafts
that see them (the cycle draft_len="auto" runs with lookups on offer), with and without the adapter. Drafts come
from the runtime's draft forward on each context's cache (checked against generate()'s first cycle at a sample of
contexts; a draft and a verify forward of width k + 1). Each is priced by the forward times draft_len="auto"
measures at batch 1 (eager; `--compile` for compiled forwards), and a dynamic program over positions finds the
cheapest sequence of cycles per answer: an oracle that knows every cycle's outcome. No planner choosing among these
cycles can beat it, so the ratio of the two oracles bounds what the adapter can add at batch 1 here (the runtime's
own per-cycle work and single-forward cycles are left out).

    python scripts/bench_ceiling.py --adapter runs/tiny_code/train/linear_spec_lora [--n 16] [--compile]
"""

from __future__ import annotations

import argparse
import platform
from collections import Counter
from collections.abc import Sequence

import torch
from tqdm import tqdm

import nld_lora
from nld_lora.data.readers import read_prompts
from nld_lora.decoding.api import normalize_prompts
from nld_lora.decoding.auto import between_widths
from nld_lora.decoding.batch import DecodeBatch
from nld_lora.decoding.lookup import NgramIndex
from nld_lora.decoding.settings import DecodeSettings
from nld_lora.decoding.stats import RequestStats
from nld_lora.report.paired import first_cycle_drafts
from nld_lora.report.speed import forward_ms

Option = tuple[str, int, int, float]  # (kind, k, tokens committed, seconds)


def agreeing(drafts: list[int], truth: list[int]) -> int:
    """Length of the common prefix of drafts and the AR tokens after the seed: the drafts greedy verify accepts."""
    n = 0
    while n < len(drafts) and n < len(truth) and drafts[n] == truth[n]:
        n += 1
    return n


def forward_times(model, prompt: list[int], compiled: bool) -> dict[int, float]:
    """Batch-1 forward seconds by width, as draft_len="auto" measures them (one auto decode takes the widths)."""
    model.generate([prompt], mode="self_spec", draft_len="auto", max_new_tokens=8, batch_size=1, adapter=False,
                   compile=compiled)
    return {int(width): ms / 1e3 for width, ms in forward_ms(model, compiled).items()}


def diffusion_drafts(model, full: list[list[int]], starts: list[int], adapter: str | None, lens: list[int],
                     leads: dict[tuple[int, int], list[int]] | None = None, cuts: Sequence[int] = (),
                     ) -> dict[tuple[int, int], dict[tuple[int, int], list[int]]]:
    """(c, k) -> (answer i, committed s) -> the k drafts after seed full[i][starts[i] + s] of a draft block whose
    first c drafts are leads[(i, s)][:c] (a lookup draft; c = 0: none, c in `cuts`, c < k, only where the lead
    has c tokens) and the others the diffusion pass's, as the runtime's draft forward makes them: one causal
    prefill of each prompt + answer (the cache of every shorter context is its prefix), then, from the last
    position back (a forward writes past its context only), a draft forward per (c, k) with every row's cache cut
    to its context."""
    batch = DecodeBatch(model, full, list(range(len(full))), [RequestStats() for _ in full],
                        capacity=max(map(len, full)) + max(lens) + 2, adapter=adapter)
    batch.build_twins(quadratic=False)
    batch.prefill()
    mask_id = model.mask_token_id
    shapes = [(0, k) for k in lens] + ([(c, k) for c in cuts for k in lens if c < k] if leads else [])
    drafts: dict[tuple[int, int], dict[tuple[int, int], list[int]]] = {shape: {} for shape in shapes}
    longest = max(len(f) - p for f, p in zip(full, starts))
    for s in tqdm(range(longest - 2, -1, -1), desc=f"draft forwards ({adapter or 'base'})", leave=False):
        in_answer = [starts[i] + s + 1 < len(f) for i, f in enumerate(full)]  # the others draft past their
        # answer's end, in slots no context of theirs reads
        batch.rewind([starts[i] + s if on else len(f) for i, (f, on) in enumerate(zip(full, in_answer))])
        seeds = torch.tensor([f[n] if on else mask_id for f, n, on in zip(full, batch.lengths, in_answer)],
                             device=model.device)
        offered = [(leads or {}).get((i, s), []) for i in range(len(full))]
        for c, k in shapes:
            lead = [f[:c] for f in offered]
            active = [on and len(found) == c for on, found in zip(in_answer, lead)]
            if not any(active):
                continue
            made, _ = batch.draft(seeds, k, [found if on and c else [] for found, on in zip(lead, active)])
            for i, row in enumerate(made.tolist()):
                if active[i]:
                    drafts[(c, k)][(i, s)] = row
    return drafts


def cheapest(n_tokens: int, options: list[list[Option]]) -> tuple[float, Counter]:
    """Least seconds to commit tokens 1..n_tokens - 1 of an answer (token 0 comes with the prefill), options[s]: the
    cycles available with tokens 0..s committed; and the kinds of cycle that path takes."""
    best = [float("inf")] * n_tokens
    step: list[Option | None] = [None] * n_tokens
    best[0] = 0.0
    for s in range(n_tokens - 1):
        for option in options[s]:
            to = min(s + option[2], n_tokens - 1)
            if best[s] + option[3] < best[to]:
                best[to], step[to] = best[s] + option[3], (*option[:3], s)
    kinds, at = Counter(), n_tokens - 1
    while at > 0:
        kind, k, _, frm = step[at]
        kinds[f"{kind} {k}" if k else kind] += 1
        at = frm
    return best[-1], kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/tiny-nld-code")
    p.add_argument("--adapter", default=None, help="the adapter to bound (without one: the base model's oracles only)")
    p.add_argument("--prompts", default="data/prompts/code_eval.jsonl")
    p.add_argument("--n", type=int, default=16, help="number of prompts (the first n, as bench_decode.py)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--ngram", type=int, default=3, help="prompt-lookup n-gram size, as the bench's ngram rows")
    p.add_argument("--draft-lens", default="1,2,3,4,6,8,11,15", help="diffusion and lookup draft lengths scored")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per generate() call of the check")
    p.add_argument("--check", type=int, default=64, help="contexts whose drafts are checked against generate()")
    p.add_argument("--lookup-cuts", default="1,2,3,4,6", help="lookup tokens leading a merged cycle's drafts")
    p.add_argument("--compile", action="store_true", help="price by compiled forwards instead of eager ones")
    args = p.parse_args()
    lens = sorted({int(k) for k in args.draft_lens.split(",")})
    cuts = sorted({int(c) for c in args.lookup_cuts.split(",") if c})

    model = nld_lora.load(args.model)
    drafters: dict[str, str | bool] = {"base": False}
    if args.adapter:
        model.attach_adapter(args.adapter)
        drafters["adapter"] = model.active_adapter
    records, _ = read_prompts(args.prompts, limit=args.n)
    prompts = normalize_prompts(model, [r.prompt for r in records])
    answers = model.generate(prompts, mode="ar", max_new_tokens=args.max_new_tokens, batch_size=8,
                             adapter=False).sequences
    times = forward_times(model, prompts[0], args.compile)
    if max(lens) + 1 > max(times):
        raise SystemExit(f"--draft-lens up to {max(lens)} need forward times up to width {max(lens) + 1}; "
                         f"measured {sorted(times)}")
    cost = {w: between_widths(times, w) for w in range(1, max(lens) + 2)}

    full = [prompt + answer for prompt, answer in zip(prompts, answers)]
    starts = [len(prompt) for prompt in prompts]
    where = [(i, s) for i, answer in enumerate(answers) for s in range(len(answer) - 1)]
    lookups = {(i, s): NgramIndex(prompts[i] + answers[i][:s + 1], args.ngram).draft(max(lens)) for i, s in where}
    drafts = {name: diffusion_drafts(model, full, starts, adapter or None, lens, lookups, cuts)
              for name, adapter in drafters.items()}
    check = where[:: max(1, len(where) // args.check)]  # the same drafts through generate(), at a sample of contexts
    agree = {name: sum(ref == drafts[name][(0, max(lens))][c] for ref, c in zip(
        first_cycle_drafts(model, [full[i][:starts[i] + s] for i, s in check], [answers[i][s] for i, s in check],
                           adapter, DecodeSettings(draft_len=max(lens)), args.batch_size), check))
             for name, adapter in drafters.items()}
    if min(agree.values()) < 0.95 * len(check):
        raise SystemExit(f"the cached draft forwards match generate()'s drafts at only {agree} of {len(check)} "
                         "contexts: the oracle would not price the runtime's drafts")

    options: dict[str, list[list[list[Option]]]] = {}  # oracle -> answer -> s -> its options
    plans = {"AR steps only": (None, False, False), "lookup + AR": (None, True, False)}
    plans.update({f"diffusion ({name}) + AR": (name, False, False) for name in drafters})
    plans.update({f"lookup + diffusion ({name}) + AR": (name, True, False) for name in drafters})
    plans.update({f"lookup + diffusion + merged ({name}) + AR": (name, True, True) for name in drafters})
    for label, (drafter, with_lookups, merged) in plans.items():
        per_answer = [[[("ar", 0, 1, cost[1])] for _ in range(max(len(a) - 1, 0))] for a in answers]
        for i, s in where:
            truth = answers[i][s + 1:]
            found = lookups[(i, s)]
            if with_lookups:
                per_answer[i][s] += [("lookup", k, agreeing(found[:k], truth) + 1, cost[k + 1])
                                     for k in lens if k <= len(found)]
            if drafter:
                per_answer[i][s] += [(f"merged {c}+" if c else "draft", k, agreeing(drafted[(i, s)], truth) + 1,
                                      2 * cost[k + 1])
                                     for (c, k), drafted in drafts[drafter].items()
                                     if (c == 0 or merged) and (i, s) in drafted]
        options[label] = per_answer

    print(f"model {args.model}, adapter {args.adapter}, {len(prompts)} prompts, {sum(map(len, answers))} AR tokens, "
          f"{'compiled' if args.compile else 'eager'} batch-1 forwards (ms by width: "
          + ", ".join(f"{w}: {1e3 * t:.2f}" for w, t in sorted(times.items())) + f"); {platform.processor() or platform.machine()}")
    print("drafts equal to generate()'s at " + ", ".join(f"{len(check)} contexts ({name}): {n}"
                                                        for name, n in agree.items()))
    print(f"{'oracle (perfect foresight, forward time only)':>48} {'ms':>9} {'tok/s':>8} {'vs AR':>6}  cycles")
    ar_s = None
    results = {}
    for label, per_answer in options.items():
        total, kinds = 0.0, Counter()
        for answer, opts in zip(answers, per_answer):
            if len(answer) > 1:
                seconds, used = cheapest(len(answer), opts)
                total, kinds = total + seconds, kinds + used
        ar_s = total if ar_s is None else ar_s
        results[label] = total
        tokens = sum(max(len(a) - 1, 0) for a in answers)
        summary = " ".join(f"{kind}:{n}" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:8])
        print(f"{label:>48} {1e3 * total:9.1f} {tokens / total:8.1f} {ar_s / total:5.2f}x  {summary}")
    if args.adapter:
        print("ceiling of best with adapter / best without: " + ", ".join(
            f"{results[f'{kinds} (base) + AR'] / results[f'{kinds} (adapter) + AR']:.3f} ({kinds})"
            for kinds in ("lookup + diffusion + merged", "lookup + diffusion", "diffusion")))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
