"""Stage 3: before/after acceptance report, measured with the same runtime on held-out prompts."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nld_lora.adapter.attach import check_lora_mode
from nld_lora.adapter.meta import AdapterMeta
from nld_lora.config_io import bounded, check_ranges, writable_dir
from nld_lora.data.readers import read_prompts
from nld_lora.data.templates import has_chat_template, render_prompt, uses_chat_template
from nld_lora.decoding.api import GenerationResult
from nld_lora.decoding.interleave import interleaved
from nld_lora.decoding.settings import DecodeSettings
from nld_lora.decoding.stats import GenerationStats, safe_ratio
from nld_lora.modes import mode_plan
from nld_lora.report.metrics import (
    acceptance_ci,
    lossless_mismatches,
    relative_gain,
    summarize_run,
    token_agreement,
)
from nld_lora.report.paired import first_position_paired
from nld_lora.report.plots import plot_categories, plot_histograms, plot_per_position
from nld_lora.report.speed import draft_cycle_cost, fastest_modes, forward_ms
from nld_lora.report.writers import write_markdown

SCHEMA_VERSION = 1


@dataclass
class ReportConfig:
    max_new_tokens: int = bounded(128, ge=1)
    batch_size: int = bounded(8, ge=1)
    speed_prompts: int = bounded(32, ge=1)  # prompts timed again at batch size 1
    decode: DecodeSettings = field(default_factory=DecodeSettings)  # one draft_len for every self-spec run
    diffusion: bool = True
    limit: int | None = bounded(None, ge=1)
    system_prompt: str | None = None
    use_chat_template: bool | None = None  # as in collection: None = only conversations / with a system prompt
    lora_mode: str | None = None  # None: each adapter's own (its nld_adapter.json, else draft_only); "both" also
    # runs verify with the adapter, so output then differs from AR
    fit_prompts: int = bounded(0, ge=0)  # also measure before/after on this many training prompts (fit vs transfer)
    fastest_mode: bool = True  # speed rows also for the fastest lossless mode (report/speed.py), chosen on
    # the speed_prompts that follow the timed ones
    speed_rounds: int = bounded(3, ge=1)  # the fastest modes and AR are timed interleaved in this many rounds (medians)
    paired_contexts: int = bounded(1000, ge=0)  # r_1 with and without the first adapter at the same contexts: this many cycle
    # starts of each run (report/paired.py; 0: off)


def machine_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "device": "cpu"}
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name())
    return info


def build_report(model: Any, adapters: list[str], prompts: str | Path, out_dir: str | Path,
                 cfg: ReportConfig | None = None, *, progress: bool = True,
                 extra: dict[str, Any] | None = None, fit_source: list | None = None,
                 other_base: bool = False) -> dict[str, Any]:
    """Run AR, diffusion, self-spec before and after each adapter; write report.json, report.md and plots.
    other_base: attach adapters trained on other base weights too.

    extra: additional top-level fields stored in report.json (the recipe records what produced the report).
    fit_source: the adapter's training prompts (records); cfg.fit_prompts of them, sampled with the seed, are
    measured before/after too, so over-fitting shows next to the held-out figure.
    """
    cfg = cfg or ReportConfig()
    check_ranges(cfg)
    report_settings(model, cfg)  # every setting is checked before anything is attached or written
    records, _ = read_prompts(prompts, limit=cfg.limit)
    out = writable_dir(out_dir)
    names: list[str] = []
    try:
        for i, path in enumerate(adapters):
            names.append(model.attach_adapter(path, name=f"adapter{i}" if len(adapters) > 1 else "after",
                                              lora_mode=cfg.lora_mode, other_base=other_base))
        settings = decode_for_runs(model, cfg, names)
        return _measure_and_write(model, names, adapters, records, prompts, out, cfg, settings, progress, extra,
                                  fit_source)
    finally:
        for name in names:  # also after an error: the caller's model comes back without the report's adapters
            model.detach_adapter(name)


def report_settings(model: Any, cfg: ReportConfig) -> DecodeSettings:
    """Checks the report's decode settings before anything is attached or written (a fixed draft length)."""
    if cfg.decode.auto_draft:
        raise ValueError("report: decode.draft_len must be a fixed length (acceptance is compared at one draft "
                         "length); the fastest-mode rows already time draft_len='auto'")
    if cfg.lora_mode is not None:
        check_lora_mode(cfg.lora_mode)
    return cfg.decode.resolved(model.block_size).validate()


def decode_for_runs(model: Any, cfg: ReportConfig, names: list[str]) -> DecodeSettings:
    """The one decode setting every self-speculation run uses: with draft_len None, the attached adapters' trained
    length where they all share one (DecodeSettings.resolved's rule), else block_size - 1."""
    metas = {name: model.adapters[name].meta for name in names}
    lens = {m.draft_len if m.draft_layout == "linear" else None for m in metas.values()}
    shared = next(iter(metas.values())) if len(lens) == 1 else None
    return cfg.decode.resolved(model.block_size, shared).validate()


def _measure_and_write(model: Any, names: list[str], adapters: list[str], records: list, prompts: str | Path,
                       out: Path, cfg: ReportConfig, settings: DecodeSettings, progress: bool,
                       extra: dict[str, Any] | None, fit_source: list | None) -> dict[str, Any]:
    """The report's steps with adapters attached as `names`: plan, measure, check, assemble, write."""
    texts = [render_prompt(r, model.tokenizer, system_prompt=cfg.system_prompt,
                           use_chat_template=cfg.use_chat_template) for r in records]
    categories = [r.category for r in records]
    common = {"max_new_tokens": cfg.max_new_tokens, "settings": settings, "progress": progress}
    plans = mode_plan(adapters={n: n for n in names}, diffusion={"diffusion": {}} if cfg.diffusion else None,
                      without_adapter="before")
    runs, results = measure_runs(model, plans, texts, categories, cfg, common)
    sequences = {label: res.sequences for label, res in results.items()}
    say = tqdm.write if progress else (lambda _text: None)
    if cfg.fastest_mode:
        say(f"report: timing the fastest lossless mode of {len(names) + 1} runs at batch 1 ({cfg.speed_rounds} rounds)")
    forward_costs = measure_fastest(model, runs, plans, texts, names, cfg, settings) if cfg.fastest_mode else None
    lossless = check_lossless(sequences, ["before", *names], records, settings, cfg.diffusion)
    report = assemble(model, names, adapters, records, prompts, cfg, settings, runs, lossless)
    exact = lossless["checked"] and names and all(lossless["per_run"][lab]["mismatches"] == 0
                                                  for lab in ("before", names[0]))
    if exact and cfg.paired_contexts > 0:  # the contexts are the runs' own only when both emitted AR's tokens
        say(f"report: r_1 with and without the adapter at the same {cfg.paired_contexts} contexts")
        report["first_position_paired"] = first_position_paired(
            model, results["before"], results[names[0]], names[0], settings, cfg.paired_contexts, cfg.batch_size,
            settings.seed)
    if forward_costs:
        report["forward_ms_batch1"] = forward_costs
        report["draft_cycle_batch1"] = {key: draft_cycle_cost(report[key]["per_position_acceptance"], forward_costs)
                                        for key in ("before", "after")}
    if fit_source and cfg.fit_prompts > 0 and names:
        say(f"report: before/after on {cfg.fit_prompts} training prompts (fit)")
        report["fit"] = _fit_vs_transfer(model, fit_source, cfg, names[0], common, report)
    report.update(extra or {})
    write_report(report, {lab: runs[lab] for lab in ("before", *names)}, out)
    return report


def measure_runs(model: Any, plans: dict[str, dict[str, Any]], texts: list[str], categories: list[str],
                 cfg: ReportConfig, common: dict[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
    """Every planned run at cfg.batch_size (summaries, and the GenerationResults) and again at batch 1 on the speed
    prompts, each interleaved (decoding/interleave.py: every run decodes a batch before any starts the next), so a
    slow spell of the machine lands on all runs alike. Chunk i samples with seed settings.seed + i."""
    settings = common["settings"]

    def runner(plan: dict[str, Any], batch_size: int, bar: tqdm):
        def run(chunk: list[int]) -> Any:
            chunk_settings = settings.replace(seed=settings.seed + chunk[0])
            res = model.generate([texts[i] for i in chunk], batch_size=batch_size, **plan,
                                 **{**common, "progress": False, "settings": chunk_settings})
            bar.update(len(chunk))
            return res
        return run

    order = list(range(len(texts)))
    speed_order = order[: cfg.speed_prompts]
    with tqdm(total=len(plans) * (len(order) + len(speed_order)), desc="report runs (interleaved)", unit="prompt",
              disable=not common["progress"]) as bar:
        parts = interleaved(order, {label: runner(plan, cfg.batch_size, bar) for label, plan in plans.items()},
                            batch_size=cfg.batch_size)
        speed = interleaved(speed_order, {label: runner(plan, 1, bar) for label, plan in plans.items()}, batch_size=1)
    runs: dict[str, dict[str, Any]] = {}
    results = {label: GenerationResult.concat(p) for label, p in parts.items()}
    for label, plan in plans.items():
        spec_k = settings.draft_len if plan["mode"] == "self_spec" else None
        runs[label] = summarize_run(results[label].stats, spec_k, categories, settings.seed)
        runs[label]["tokens_per_s_batch1"] = GenerationStats.concat([r.stats for r in speed[label]]).tokens_per_s
    for run in runs.values():
        run["speedup_vs_ar"] = safe_ratio(run["tokens_per_s"], runs["ar"]["tokens_per_s"])
        run["speedup_vs_ar_batch1"] = safe_ratio(run["tokens_per_s_batch1"], runs["ar"]["tokens_per_s_batch1"])
    return runs, results


def measure_fastest(model: Any, runs: dict[str, dict], plans: dict[str, dict], texts: list[str], names: list[str],
                    cfg: ReportConfig, settings: DecodeSettings) -> dict[str, float]:
    """runs[label]["fastest"] for the run without and each run with an adapter, timed interleaved
    (report/speed.py); returns the batch-1 forward times (ms by width) draft_len="auto" measured."""
    timed = texts[: cfg.speed_prompts]
    selection = texts[cfg.speed_prompts: 2 * cfg.speed_prompts] or timed
    labels = ("before", *names)
    fastest = fastest_modes(model, {label: plans[label]["adapter"] for label in labels}, selection, timed, settings,
                            cfg.max_new_tokens, cfg.speed_rounds)
    for label in labels:
        runs[label]["fastest"] = {**fastest[label], "selected_on_timed_prompts": selection is timed}
    return forward_ms(model)


def check_lossless(sequences: dict[str, list[list[int]]], spec_labels: list[str], records: list,
                   settings: DecodeSettings, diffusion: bool) -> dict[str, Any]:
    """Greedy self-speculation must emit AR's tokens: mismatching prompts per run (diffusion: agreement only)."""
    greedy = settings.temperature <= 0
    per_run_mismatch = {lab: lossless_mismatches(sequences["ar"], sequences[lab]) for lab in spec_labels}
    lossless = {
        "checked": greedy,
        "mismatches": sum(len(v) for v in per_run_mismatch.values()) if greedy else None,
        "per_run": {lab: {"mismatches": len(v), "prompt_ids": [records[i].id for i in v]}
                    for lab, v in per_run_mismatch.items()} if greedy else {},
    }
    if diffusion:
        lossless["diffusion_agreement"] = token_agreement(sequences["ar"], sequences["diffusion"])
    return lossless


def assemble(model: Any, names: list[str], adapters: list[str], records: list, prompts: str | Path,
             cfg: ReportConfig, settings: DecodeSettings, runs: dict[str, dict],
             lossless: dict[str, Any]) -> dict[str, Any]:
    """The report dictionary (docs/report_schema.md) from the measured runs."""
    after_label = names[0] if names else "before"
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "n_prompts": len(records),
        "prompts": str(prompts),
        "model": {"path": model.name_or_path, "weights_hash": model.weights_hash},
        "adapters": [{"name": n, "path": p, "lora_mode": model.adapters[n].lora_mode, "meta": _adapter_summary(p)}
                     for n, p in zip(names, adapters)],
        "machine": machine_info(),
        "prompt_format": prompt_format(model.tokenizer, records, cfg),
        "settings": {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                     "block_size": settings.block_size, "draft_len": settings.draft_len,
                     "temperature": settings.temperature, "threshold": settings.threshold,
                     "speed_prompts": min(cfg.speed_prompts, len(records)), "lora_mode": cfg.lora_mode},
        "ar": runs["ar"],
        "before": runs["before"],
        "after": runs[after_label],
        "runs": runs,
        "gain": {
            "acceptance_length_rel": relative_gain(runs["before"]["acceptance_length"],
                                                   runs[after_label]["acceptance_length"]),
            "tpf_rel": relative_gain(runs["before"]["tpf"], runs[after_label]["tpf"]),
        },
        "lossless": lossless,
        "categories": sorted({r.category or "uncategorized" for r in records}),
    }
    if "diffusion" in runs:
        report["diffusion"] = runs["diffusion"]
    return report


def write_report(report: dict[str, Any], spec_runs: dict[str, dict], out: Path) -> None:
    """Plots, then report.json (through a temporary file) and report.md next to them."""
    report["plots"] = {
        "histogram": plot_histograms(spec_runs, out / "acceptance_histogram.png"),
        "per_position": plot_per_position(spec_runs, out / "per_position.png"),
        "categories": plot_categories(spec_runs, out / "categories.png"),
    }
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    write_markdown(report, out / "report.md")


def _fit_vs_transfer(model: Any, fit_source: list, cfg: ReportConfig, adapter: str, common: dict[str, Any],
                     report: dict[str, Any]) -> dict[str, Any]:
    """Before/after acceptance on a seeded sample of training prompts, beside the held-out figures."""
    sample = random.Random(cfg.decode.seed).sample(fit_source, min(cfg.fit_prompts, len(fit_source)))
    texts = [render_prompt(r, model.tokenizer, system_prompt=cfg.system_prompt,
                           use_chat_template=cfg.use_chat_template) for r in sample]
    fit: dict[str, Any] = {"n_prompts": len(sample)}
    for label, name in (("before", False), ("after", adapter)):
        res = model.generate(texts, mode="self_spec", adapter=name, batch_size=cfg.batch_size, **common)
        fit[label] = res.stats.acceptance_length
        fit[f"{label}_ci95"] = list(acceptance_ci(res.stats.requests, seed=cfg.decode.seed))
    fit["gain"] = relative_gain(fit["before"], fit["after"])
    fit["transfer_gain"] = report["gain"]["acceptance_length_rel"]
    return fit


def prompt_format(tokenizer: Any, records: list, cfg: ReportConfig) -> dict[str, Any]:
    """How prompts became model input: whether the chat template applied (and which, by hash), system prompt."""
    template = tokenizer.chat_template if has_chat_template(tokenizer) else None
    applied = any(uses_chat_template(r, tokenizer, system_prompt=cfg.system_prompt,
                                     use_chat_template=cfg.use_chat_template) for r in records)
    return {"chat_template_applied": applied,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:12] if template else None,
            "use_chat_template": cfg.use_chat_template, "system_prompt": cfg.system_prompt}


def _adapter_summary(path: str) -> dict[str, Any]:
    meta = AdapterMeta.read(path)
    found = {"base_model": meta.base_model, "base_weights_hash": meta.base_weights_hash, "draft_len": meta.draft_len,
             "step": meta.step}
    return {k: v for k, v in found.items() if v not in (None, "")}


def headline(report: dict[str, Any]) -> str:
    """The few lines a console shows at the end of the recipe."""
    b, a = report["before"], report["after"]
    lines = [
        f"acceptance length  {b['acceptance_length']:.3f} -> {a['acceptance_length']:.3f} "
        f"({100 * report['gain']['acceptance_length_rel']:+.1f}%)",
        f"TPF                {b['tpf']:.3f} -> {a['tpf']:.3f} ({100 * report['gain']['tpf_rel']:+.1f}%)",
        f"speed vs AR        {b['speedup_vs_ar']:.2f}x -> {a['speedup_vs_ar']:.2f}x "
        f"(batch {report['settings']['batch_size']}); AR {report['ar']['tokens_per_s']:.1f} tok/s",
        f"lossless check     {report['lossless']['mismatches']} mismatching prompts of {report['n_prompts']}",
    ]
    if "fastest" in a:
        fb, fa = b["fastest"], a["fastest"]
        lines.append(f"fastest lossless   {fb['mode']} {fb['speedup_vs_ar_batch1']:.2f}x -> {fa['mode']} "
                     f"{fa['speedup_vs_ar_batch1']:.2f}x AR at batch 1; AR {report['ar']['tokens_per_s_batch1']:.1f} "
                     "tok/s")
    if "fit" in report:
        fit = report["fit"]
        lines.append(f"fit vs transfer    {100 * fit['gain']:+.1f}% on {fit['n_prompts']} training prompts, "
                     f"{100 * fit['transfer_gain']:+.1f}% on the held-out ones")
    return "\n".join(lines)
