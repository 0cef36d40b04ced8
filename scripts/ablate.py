"""Ablation of the drafter's training levers, one change at a time against the same baseline and seed.

    python scripts/ablate.py --collect runs/tiny_code/collect --out runs/ablate \
        --variant "baseline:" --variant "wd0.1:weight_decay=0.1" --variant "r8:lora.r=8,lora.alpha=16"

Each variant is `name:override,override,...` (TrainConfig keys over --config). Every variant trains on the same
collected targets (or on --variant-collect NAME=DIR), then is measured with the runtime (greedy self-speculation,
block and draft length of the model) on the VALIDATION prompts: prompts of --prompts whose source file falls in
the trainer's held-out groups (eval_split=group, same seed and fraction). No variant trains on those files, and
the report's held-out set (code_eval.jsonl) is not used here, so choosing by this table keeps the reported
figure clean. Prints a markdown table: validation acceptance before/after with 95% intervals, gain, r_1 (the
first draft position's acceptance rate, which every cycle pays for), wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nld_lora
from nld_lora.config_io import load_config
from nld_lora.data.readers import FieldMap, read_prompts
from nld_lora.report.metrics import acceptance_ci, relative_gain
from nld_lora.train import TrainConfig, train
from nld_lora.train.data import Sequence, split_eval


def validation_prompts(path: str, cfg: TrainConfig, group_field: str, limit: int) -> list:
    """Prompts of the trainer's held-out groups: the same hash rule the trainer applies to collected data."""
    records, _ = read_prompts(path, FieldMap(group=group_field))
    seqs = [Sequence([], 0, r.id, r.group) for r in records]
    _, held = split_eval(seqs, cfg.eval_fraction, cfg.seed, by="group")
    held_ids = {s.prompt_id for s in held}
    return [r for r in records if r.id in held_ids][:limit]


def measure(model, prompts: list[str], adapter, max_new_tokens: int, seed: int) -> tuple[float, list[float], float]:
    """Acceptance length, its 95% interval and r_1 (the first draft position's acceptance rate)."""
    res = model.generate(prompts, mode="self_spec", adapter=adapter, max_new_tokens=max_new_tokens, batch_size=8,
                         seed=seed)
    stats = res.stats
    return stats.acceptance_length, list(acceptance_ci(stats.requests, seed=seed)), stats.per_position_acceptance[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/tiny-nld-code")
    p.add_argument("--collect", required=True, help="collected targets shared by the variants")
    p.add_argument("--variant-collect", action="append", default=[], help="NAME=DIR: this variant's own targets")
    p.add_argument("--config", default="recipes/configs/tiny_code.yaml", help="recipe YAML; its train section")
    p.add_argument("--variant", action="append", required=True, help="name:key=value,key=value")
    p.add_argument("--prompts", default="data/prompts/code_train.jsonl", help="where validation prompts come from")
    p.add_argument("--group-field", default="source_file")
    p.add_argument("--n", type=int, default=150, help="validation prompts")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", default="runs/ablate")
    args = p.parse_args()

    from nld_lora.recipe import RecipeConfig

    base = load_config(RecipeConfig, args.config).train
    own_data = dict(item.split("=", 1) for item in args.variant_collect)
    val = validation_prompts(args.prompts, base, args.group_field, args.n)
    model = nld_lora.load(args.model)
    texts = [r.prompt for r in val]
    before, before_ci, before_r1 = measure(model, texts, False, args.max_new_tokens, base.seed)
    rows = []
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        cfg = load_config(RecipeConfig, args.config, [f"train.{o}" for o in overrides.split(",") if o]).train
        t0 = time.perf_counter()
        res = train(model, own_data.get(name, args.collect), Path(args.out) / name, cfg, progress=False)
        wall = time.perf_counter() - t0
        adapter = model.attach_adapter(res.adapter_dir)
        after, after_ci, r1 = measure(model, texts, adapter, args.max_new_tokens, base.seed)
        model.detach_adapter()
        rows.append({"variant": name, "overrides": overrides, "val_after": after, "val_after_ci95": after_ci,
                     "gain": relative_gain(before, after), "r1": r1, "simulated_metric": res.best_simulated_acceptance,
                     "deployed_metric": res.deployed_best, "fit_metric": res.fit_best_simulated_acceptance,
                     "best_step": res.best_step, "train_s": wall})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nValidation: {len(val)} prompts from held-out files of {args.prompts}; before (no adapter) "
          f"{before:.3f} [{before_ci[0]:.2f}, {before_ci[1]:.2f}], r_1 {before_r1:.3f}\n")
    print("| variant | change | validation acceptance after [95% CI] | gain | r_1 | simulated metric (held-out "
          "files) | deployed-loop metric (same files) | fit metric (training seqs, simulated) | best step | train s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lo, hi = r["val_after_ci95"]
        fit = f"{r['fit_metric']:.3f}" if r["fit_metric"] is not None else "-"
        deployed = f"{r['deployed_metric']:.3f}" if r["deployed_metric"] is not None else "-"
        print(f"| {r['variant']} | `{r['overrides'] or '-'}` | {r['val_after']:.3f} [{lo:.2f}, {hi:.2f}] | "
              f"{100 * r['gain']:+.1f}% | {r['r1']:.3f} | {r['simulated_metric']:.3f} | {deployed} | {fit} | {r['best_step']} | "
              f"{r['train_s']:.0f} |")


if __name__ == "__main__":
    main()
