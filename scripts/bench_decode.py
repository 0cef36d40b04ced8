"""Decode benchmark: per mode, at batch 1 and batch 8, TPF, mean acceptance, tokens/s, speedup over AR and the
runtime's overhead share (wall time outside model forwards / total wall time) and, for draft_len="auto", the draft
lengths chosen (k:cycles, 0 = an AR step) and each row's tail (how much longer its batches ran than their mean
row: a batch waits for its slowest row); rows with torch.compile (compiled, and auto's forward costs measured,
outside the timing); plus transformers' own greedy `generate` and its prompt-lookup decoding on the same weights (the model's AR view) as
batch-1 baselines.

    python scripts/bench_decode.py [--model data/tiny-nld-code] [--adapter DIR] [--prompts FILE] [--n 32]

All rows run in the same process on the same prompts, so the speedup column compares like with like.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from typing import Any

import torch

import nld_lora
from nld_lora.adapter.twins import forward_costs
from nld_lora.data.readers import read_prompts
from nld_lora.decoding.api import normalize_prompts
from nld_lora.decoding.interleave import interleaved
from nld_lora.decoding.stats import GenerationStats
from nld_lora.model.export import export_ar_view


def load_ar_view(model):
    """transformers' own Ministral3ForCausalLM on the model's weights (its AR view)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        view = export_ar_view(model.source_folder, tmp)
        return AutoModelForCausalLM.from_pretrained(str(view), dtype=model.dtype).to(model.device).eval()


def transformers_runner(hf, model, args, extra: dict[str, Any]):
    """transformers' `generate` on the AR view, one prompt at a time: a batch's (token lists, seconds)."""
    eos = sorted(model.eos_token_ids)
    pad = model.config.pad_token_id or 0

    def run(prompts: list[str]) -> tuple[list[list[int]], float]:
        outs, t0 = [], time.perf_counter()
        for ids in normalize_prompts(model, prompts):
            x = torch.tensor([ids], device=model.device)
            outs.append(hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                    do_sample=False, eos_token_id=eos, pad_token_id=pad, **extra)[0, len(ids):].tolist())
        return outs, time.perf_counter() - t0
    return run


def decoder(model, args, bs: int, kw: dict[str, Any]):
    """One row's runner: a batch of prompts decoded with the row's keywords, profiled; returns the result."""
    return lambda prompts: model.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=bs, profile=True,
                                          **{"adapter": False, **kw})


def decode_rows(args, model) -> list[tuple[str, dict]]:
    """(label, generate keywords) per row; the first row (eager AR) is the speed reference of its batch size."""
    ngram = {"ngram": args.ngram} if args.ngram else {}
    rows = [("ar", {"mode": "ar"}), ("diffusion", {"mode": "diffusion"}), ("self_spec", {"mode": "self_spec"}),
            ("self_spec auto", {"mode": "self_spec", "draft_len": "auto"}),
            ("self_spec_quadratic k3", {"mode": "self_spec_quadratic"}),
            ("self_spec_quadratic auto", {"mode": "self_spec_quadratic", "draft_len": "auto"})]
    if ngram:
        rows += [("self_spec ngram", {"mode": "self_spec", **ngram}),
                 ("self_spec auto ngram", {"mode": "self_spec", "draft_len": "auto", **ngram}),
                 ("self_spec_quadratic k3 ngram", {"mode": "self_spec_quadratic", **ngram})]
    if args.adapter:
        model.attach_adapter(args.adapter)
        lora = {"adapter": model.active_adapter}
        rows += [("self_spec+lora", {"mode": "self_spec", **lora}),
                 ("self_spec+lora auto", {"mode": "self_spec", "draft_len": "auto", **lora}),
                 ("self_spec_quadratic+lora k3", {"mode": "self_spec_quadratic", **lora}),
                 ("self_spec_quadratic+lora auto", {"mode": "self_spec_quadratic", "draft_len": "auto", **lora})]
        if ngram:
            rows += [("self_spec_quadratic+lora k3 ngram", {"mode": "self_spec_quadratic", **lora, **ngram}),
                     ("self_spec+lora ngram", {"mode": "self_spec", **lora, **ngram}),
                     ("self_spec+lora auto ngram", {"mode": "self_spec", "draft_len": "auto", **lora, **ngram})]
    if args.compile_batches:
        best = [("compiled ar", {"mode": "ar"}),
                ("compiled self_spec auto", {"mode": "self_spec", "draft_len": "auto"}),
                ("compiled self_spec_quadratic k3", {"mode": "self_spec_quadratic"})]
        if ngram:
            best.insert(2, ("compiled self_spec auto ngram", {"mode": "self_spec", "draft_len": "auto", **ngram}))
        if args.adapter:
            lora_auto = {"mode": "self_spec", "draft_len": "auto", "adapter": model.active_adapter}
            best += [("compiled self_spec+lora auto", lora_auto)]
            if ngram:
                best += [("compiled self_spec+lora auto ngram", {**lora_auto, **ngram})]
        mode = True if args.compile_mode == "default" else args.compile_mode
        rows += [(label, {**kw, "compile": mode}) for label, kw in best]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        rows = [row for row in rows if row[0] in wanted]
        if not rows or rows[0][0] != "ar":
            raise SystemExit(f"--only must start with 'ar' (the speed reference) and name existing rows; got {wanted}")
    return rows


STEP_KINDS = ("ar", "verify", "verify_draft", "denoise", "commit")  # one per loop iteration of a row (draft
# forwards pair with a verify)


def batch_tail(parts: list) -> float:
    """Loop iterations of each decode batch (its slowest row's) over its rows' mean, pooled over batches: how much
    longer a batch ran than its average row (1.0: the rows finished together, as AR's do)."""
    longest = mean = 0.0
    for part in parts:
        steps = [sum(r.forwards[k] for k in STEP_KINDS) for r in part.stats.requests]
        longest, mean = longest + max(steps), mean + sum(steps) / len(steps)
    return longest / mean if mean else 1.0


def spread(values: list[float]) -> str:
    """The lowest and highest of a row's per-round values: how far one round can move a median."""
    return f"{min(values):.2f}-{max(values):.2f}"


def print_verdicts(ratios: dict[tuple, list[float]]) -> None:
    """The comparisons a deployer reads off the table (medians of per-round ratios to AR, with the range over rounds):
    the best row with the adapter against the best without it and against transformers' prompt lookup, the best
    self-speculation row per batch size, and the slowest draft_len="auto" row."""
    med = {key: statistics.median(v) for key, v in ratios.items()}
    for bs in sorted({bs for bs, _ in med}):
        rows = {label: r for (b, label), r in med.items() if b == bs}
        spec = {label: r for label, r in rows.items() if "self_spec" in label}
        lora = {label: r for label, r in spec.items() if "+lora" in label}
        plain = {label: r for label, r in spec.items() if "+lora" not in label}
        auto = {label: r for label, r in spec.items() if "auto" in label}
        parts = []
        if spec:
            best = max(spec, key=spec.get)
            parts.append(f"best self-spec {best} {spec[best]:.2f}x AR")
        if lora and plain:
            bl, bp = max(lora, key=lora.get), max(plain, key=plain.get)
            per_round = [a / b for a, b in zip(ratios[(bs, bl)], ratios[(bs, bp)])]
            parts.append(f"best with adapter / best without: {lora[bl] / plain[bp]:.2f} ({bl} vs {bp}; rounds "
                         f"{spread(per_round)})")
            if "hf prompt-lookup" in rows:
                parts.append(f"best with adapter / hf prompt-lookup: {lora[bl] / rows['hf prompt-lookup']:.2f}")
        if auto:
            worst = min(auto, key=auto.get)
            parts.append(f"slowest auto row {worst} {auto[worst]:.2f}x AR (rounds {spread(ratios[(bs, worst)])})")
        print(f"batch {bs}: " + "; ".join(parts))


def compile_batches(args) -> set[int]:
    return {int(b) for b in args.compile_batches.split(",")} if args.compile_batches else set()


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
    p.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens of the transformers baseline")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline rows")
    p.add_argument("--ngram", type=int, default=3, help="adds self_spec rows with prompt-lookup drafts (0: none)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    p.add_argument("--only", default="", help="comma-separated row labels to run (the first must be 'ar')")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead"],
                   help="torch.compile mode of the compiled rows (reduce-overhead: CUDA graphs)")
    p.add_argument("--compile-batches", default="1", help="batch sizes that also get torch.compile rows ('': none)")
    args = p.parse_args()
    model = nld_lora.load(args.model, device=args.device, dtype=args.dtype)
    records, _ = read_prompts(args.prompts, limit=args.n)
    prompts = [r.prompt for r in records]
    rows = decode_rows(args, model)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"model {args.model}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model.generate(prompts[:2], mode="self_spec", max_new_tokens=8, adapter=False)  # warm-up
    hf = load_ar_view(model) if 1 in batch_sizes and not args.no_transformers else None  # before any compile:
    # loading it adds its class to transformers' output-capture registry, a length every compiled graph guards on,
    # so graphs compiled before it were compiled again inside the first timed round (one round of `compiled ar` at
    # batch 8 ran 3.6 s against 1.0 s)
    hf_rows = {"hf greedy": {}, "hf prompt-lookup": {"prompt_lookup_num_tokens": args.lookup}}
    for bs in batch_sizes:  # outside the timing: compile every shape family the bench's prompts reach (compiled
        for _, kw in rows:  # rows over all of them), and let draft_len="auto" measure its forward costs (once per
            if kw.get("compile") and bs not in compile_batches(args):  # process, on the first bs prompts)
                continue
            if kw.get("compile") or kw.get("draft_len") == "auto":
                model.generate(prompts if kw.get("compile") else prompts[:bs], max_new_tokens=args.max_new_tokens,
                               batch_size=bs, **{"adapter": False, **kw})
    row_kw = dict(rows)
    speeds: dict[tuple, list[float]] = {}
    ratios: dict[tuple, list[float]] = {}
    last: dict[tuple, Any] = {}
    for rnd in range(args.rounds):  # each round decodes every batch of prompts with every row before the next batch,
        for bs in batch_sizes:  # so a slow spell of the machine hits all rows alike (decoding/interleave.py)
            runners = {label: decoder(model, args, bs, kw) for label, kw in rows
                       if not (kw.get("compile") and bs not in compile_batches(args))}
            if bs == 1 and hf is not None:
                runners.update({label: transformers_runner(hf, model, args, extra) for label, extra in hf_rows.items()})
            results = interleaved(prompts, runners, batch_size=bs, start=rnd * len(range(0, len(prompts), bs)))
            stats = {label: GenerationStats.concat([part.stats for part in parts]) for label, parts in results.items()
                     if label not in hf_rows}
            ar = stats["ar"]
            for label, st in stats.items():
                speeds.setdefault((bs, label), []).append(st.tokens_per_s)
                ratios.setdefault((bs, label), []).append(st.tokens_per_s / ar.tokens_per_s)
                last[(bs, label)] = (st, row_kw[label], batch_tail(results[label]))
            ar_sequences = [seq for part in results["ar"] for seq in part.sequences]
            for label in [name for name in hf_rows if name in results]:
                outs = [seq for part, _ in results[label] for seq in part]
                speed = sum(map(len, outs)) / sum(sec for _, sec in results[label])
                speeds.setdefault((bs, label), []).append(speed)
                ratios.setdefault((bs, label), []).append(speed / ar.tokens_per_s)
                last[(bs, label)] = (sum(o == r for o, r in zip(outs, ar_sequences)), None, None)
    print(f"median of {args.rounds} rounds, rows interleaved batch by batch; 'vs AR' = median of the per-round "
          "ratios to that round's AR")
    print("'tail': loop iterations of each batch over its rows' mean (its slowest row's, pooled; 1.00: the rows "
          "finished together)")
    print("'rounds': the lowest and highest per-round ratio to AR")
    print(f"{'batch':>5} {'mode':>34} {'TPF':>7} {'accept':>7} {'tok/s':>9} {'vs AR':>7} {'rounds':>10} {'overhead':>9}"
          f" {'tail':>5}  draft lens")
    for (bs, label), values in speeds.items():
        st, kw, tail = last[(bs, label)]
        speed, ratio = statistics.median(values), statistics.median(ratios[(bs, label)])
        band = spread(ratios[(bs, label)])
        if kw is None:
            print(f"{bs:>5} {label:>34} {'-':>7} {'-':>7} {speed:>9.1f} {ratio:>6.2f}x {band:>10} {'-':>9} {'-':>5}"
                  f"  (same tokens as the runtime's AR on {st}/{len(prompts)} prompts)")
            continue
        acc = f"{st.acceptance_length:.2f}" if kw["mode"].startswith("self_spec") else "-"
        chosen = " ".join(f"{k}:{n}" for k, n in st.draft_len_choices.items())
        print(f"{bs:>5} {label:>34} {st.tpf:>7.3f} {acc:>7} {speed:>9.1f} {ratio:>6.2f}x {band:>10} "
              f"{100 * st.overhead_share:>8.1f}% {tail:>5.2f}  {chosen}")
    print_verdicts(ratios)
    costs = forward_costs(model)
    if costs:
        print("forward ms by width, as draft_len='auto' measured them (device, compiled, rows bucket):")
        for key in sorted({k[:3] for k in costs}):
            cells = "  ".join(f"{w}:{1e3 * t:.2f}" for (*k, w), t in sorted(costs.items()) if tuple(k) == key)
            print(f"  {key}: {cells}")

if __name__ == "__main__":
    main()
