"""The end-to-end recipe (collect -> train -> report) as a library function; recipes/lora_accept.py calls it.

Each stage is skipped when its output already exists and matches, so a re-run resumes the whole recipe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nld_lora.adapter.meta import AdapterMeta
from nld_lora.config_io import to_dict
from nld_lora.data.collect import CollectConfig
from nld_lora.evaluation.runner import EvalConfig
from nld_lora.report.runner import ReportConfig
from nld_lora.report.writers import write_markdown
from nld_lora.train.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RecipeConfig:
    model: str = "data/tiny-nld-code"
    train_prompts: str = "data/prompts/code_train_all.jsonl"
    eval_prompts: str = "data/prompts/code_eval.jsonl"
    out: str = "runs/tiny_code"
    wrap: bool = False
    collect: CollectConfig = field(default_factory=CollectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(limit=48, max_new_tokens=64))  # stage 4: accuracy,
    # latency and cost per mode on the held-out prompts (skipped when they carry no scorer fields)
    run_eval: bool = True


def resolve(path: str) -> str:
    """A relative path as given if it exists from the working directory, else relative to the repository."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    candidate = REPO_ROOT / p
    return str(candidate) if candidate.exists() else str(p)


def run_recipe(cfg: RecipeConfig) -> dict[str, Any]:
    """Collect AR targets, train the draft LoRA, write the before/after report; returns the report dict."""
    import nld_lora
    from nld_lora.data import collect, read_prompts
    from nld_lora.report import build_report
    from nld_lora.train import train
    from nld_lora.train.trainer import FINAL_ADAPTER, setup_accelerator

    cfg.train.validate()
    inherit_prompt_format(cfg)
    out = Path(cfg.out)
    accelerator = setup_accelerator(cfg.train, out / "train")
    say = accelerator.print
    model_path = resolve(cfg.model)
    model = nld_lora.load(model_path, wrap=cfg.wrap).to(accelerator.device)

    say(f"[1/3] collect AR targets for {cfg.train_prompts}")
    records, read_report = read_prompts(resolve(cfg.train_prompts), cfg.collect.fields,
                                        skip_bad=cfg.collect.skip_bad, limit=cfg.collect.limit)
    summary = collect(model, records, out / "collect", cfg.collect, accelerator=accelerator)
    say(f"      {summary.done_before} already done, {summary.generated} generated, skipped {summary.skipped}, "
        f"{summary.target_tokens} target tokens in {summary.wall_s:.1f}s")

    adapter = out / "train" / FINAL_ADAPTER
    if _adapter_matches(adapter, cfg.train, model.weights_hash):
        say(f"[2/3] train: {adapter} already matches this config; skipped")
    else:
        say("[2/3] train the draft-pathway LoRA" + (f" on a {cfg.train.quantization} base (QLoRA)"
                                                      if cfg.train.quantization else ""))
        res = train(training_model(model, model_path, cfg, accelerator), out / "collect", out / "train", cfg.train,
                    accelerator=accelerator)
        model.to(accelerator.device)
        say(f"      best step {res.best_step} (by {cfg.train.select_by} acceptance): simulated acceptance on held-out groups "
            f"{res.baseline_simulated_acceptance:.3f} -> {res.best_simulated_acceptance:.3f} ({res.wall_s:.0f}s)")
        if res.deployed_best is not None:
            say(f"      tokens per cycle of the deployed loop on the same targets: {res.deployed_baseline:.3f} -> "
                f"{res.deployed_best:.3f}")
        if res.fit_best_simulated_acceptance is not None:
            say(f"      on training sequences (fit): {res.fit_baseline_simulated_acceptance:.3f} -> "
                f"{res.fit_best_simulated_acceptance:.3f}")

    report_dir = out / "report"
    report: dict[str, Any] = {}
    if accelerator.is_main_process:
        existing = report_dir / "report.json"
        if existing.exists() and _report_matches(json.loads(existing.read_text()), cfg, model, adapter):
            say(f"[3/3] report: {existing} already matches; skipped")
            report = json.loads(existing.read_text())
        else:
            say(f"[3/3] report on {cfg.eval_prompts}")
            report = build_report(model, [str(adapter)], resolve(cfg.eval_prompts), report_dir, cfg.report,
                                  extra={"recipe": recipe_stamp(cfg, adapter)}, fit_source=records)
        if cfg.run_eval:
            eval_stage(model, adapter, cfg, say)
    accelerator.wait_for_everyone()
    return report


def eval_stage(model: Any, adapter: Path, cfg: RecipeConfig, say: Any) -> None:
    """Stage 4 (main process): `nld-lora eval` on the held-out prompts with the trained adapter, skipped when it
    already ran with these settings or when the prompts carry no scorer fields."""
    from nld_lora.evaluation.runner import evaluate, read_eval_records
    from nld_lora.evaluation.scorers import ScorerError

    out = Path(cfg.out) / "eval"
    stamp = {"eval": to_dict(cfg.eval), "eval_prompts": cfg.eval_prompts, "adapter_step": AdapterMeta.read(adapter).step,
             "weights_hash": model.weights_hash}
    existing = out / "eval.json"
    if existing.exists() and json.loads(existing.read_text()).get("recipe") == stamp:
        say(f"      eval: {existing} already matches; skipped")
        add_eval_to_report(Path(cfg.out) / "report", out)
        return
    try:
        read_eval_records(resolve(cfg.eval_prompts), 1)  # scorer fields present (raises otherwise)
    except ScorerError as err:
        say(f"      eval skipped: {err}")
        return
    say(f"      eval: accuracy, latency and cost per mode -> {out / 'eval.md'}")
    name = model.attach_adapter(str(adapter), name="recipe_eval")
    try:
        evaluate(model, resolve(cfg.eval_prompts), out, cfg.eval, adapter=name, extra={"recipe": stamp})
    finally:
        model.detach_adapter(name)
    add_eval_to_report(Path(cfg.out) / "report", out)


def add_eval_to_report(report_dir: Path, eval_dir: Path) -> None:
    """report.md written again from report.json and eval.json, so it shows acceptance and accuracy together."""
    report_json = report_dir / "report.json"
    if report_json.exists():
        write_markdown(json.loads(report_json.read_text()), report_dir / "report.md",
                       evaluation=json.loads((eval_dir / "eval.json").read_text()))


def training_model(model: Any, model_path: str, cfg: RecipeConfig, accelerator: Any) -> Any:
    """The model to train on: the collection model itself, or for QLoRA (train.quantization) the checkpoint loaded
    again with its Linears quantized straight onto the device while the full-precision model waits on the CPU
    (it comes back for the report)."""
    if cfg.train.quantization is None:
        return model
    import nld_lora

    model.to("cpu")
    return nld_lora.load(model_path, wrap=cfg.wrap, quantization=cfg.train.quantization, device=accelerator.device)


def inherit_prompt_format(cfg: RecipeConfig) -> None:
    """The report renders held-out prompts as collection rendered training prompts, unless told otherwise."""
    if cfg.report.system_prompt is None:
        cfg.report.system_prompt = cfg.collect.system_prompt
    if cfg.report.use_chat_template is None:
        cfg.report.use_chat_template = cfg.collect.use_chat_template


def _adapter_matches(adapter: Path, train_cfg: TrainConfig, weights_hash: str) -> bool:
    meta = AdapterMeta.read(adapter)
    return meta.base_weights_hash == weights_hash and meta.train_config == to_dict(train_cfg)


def recipe_stamp(cfg: RecipeConfig, adapter: Path) -> dict[str, Any]:
    """What produced a report: report settings, eval prompts, and the adapter's step and training config."""
    meta = AdapterMeta.read(adapter)
    prompt_keys = ("system_prompt", "use_chat_template", "thinking", "max_thinking_tokens", "end_think_token")
    return {"report": to_dict(cfg.report), "eval_prompts": cfg.eval_prompts, "adapter_step": meta.step,
            "train_config": meta.train_config or None,
            "collect": {k: getattr(cfg.collect, k) for k in prompt_keys}}


def _report_matches(report: dict[str, Any], cfg: RecipeConfig, model: Any, adapter: Path) -> bool:
    return (report.get("model", {}).get("weights_hash") == model.weights_hash
            and report.get("recipe") == recipe_stamp(cfg, adapter))
