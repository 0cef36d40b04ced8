"""`nld-lora collect|train|report|eval|generate|export`: thin argument parsing over the library.

Settings come from `--config FILE.yaml` plus dotted `key=value` overrides (the same schema and the same errors as
the recipe's sections); paths and the model stay flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nld_lora.config_io import bounded
from nld_lora.decoding.api import MODES
from nld_lora.decoding.settings import DecodeSettings

DEFAULT_MODEL = "data/tiny-nld-code"


@dataclass
class GenerateConfig:
    max_new_tokens: int = bounded(128, ge=1)
    batch_size: int | None = bounded(None, ge=1)
    limit: int | None = bounded(None, ge=1)  # prompts read from --prompt-file
    decode: DecodeSettings = field(default_factory=DecodeSettings)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="NLD folder, hub id, or HF causal LM with --wrap")
    p.add_argument("--wrap", action="store_true", help="convert a plain causal LM (adds a mask token)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the config's)")
    p.add_argument("--device", default=None)


def _add_settings_args(p: argparse.ArgumentParser, example: str, config_cls: type) -> None:
    from nld_lora.config_io import settings_help

    p.add_argument("--config", default=None, help="YAML file with this command's settings")
    p.add_argument("overrides", nargs="*", help=f"dotted key=value settings, e.g. {example}")
    p.epilog = settings_help(config_cls)
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _add_adapter_base_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter-other-base", action="store_true",
                   help="attach adapters trained on other base weights (refused by default)")


def _writable(path: str) -> Path:
    from nld_lora.config_io import writable_dir

    return writable_dir(path)


def _load(args: argparse.Namespace):
    import nld_lora

    return nld_lora.load(args.model, dtype=args.dtype, device=args.device, wrap=args.wrap)


def _settings(cls, args: argparse.Namespace):
    from nld_lora.config_io import load_config

    return load_config(cls, args.config, args.overrides)


def attach_adapters(model, paths: list[str], other_base: bool = False) -> list[str]:
    """Attach every --adapter in order (the last is active); returns their names (unique, also for folders that
    share a name)."""
    return [model.attach_adapter(path, other_base=other_base) for path in paths]


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = _settings(GenerateConfig, args)
    if args.prompt_file:
        from nld_lora.data.readers import read_prompts

        records, _ = read_prompts(args.prompt_file, limit=cfg.limit)
        prompts = [r.prompt for r in records]
    else:
        prompts = [args.prompt.replace("\\n", "\n")]
    model = _load(args)
    attach_adapters(model, args.adapter or [], args.adapter_other_base)
    res = model.generate(prompts, mode=args.mode, max_new_tokens=cfg.max_new_tokens, settings=cfg.decode,
                         batch_size=cfg.batch_size, progress=len(prompts) > 1)
    if not args.quiet:
        for prompt, text in zip(prompts, res.texts or [str(s) for s in res.sequences]):
            print(f"--- prompt ---\n{prompt}\n--- {args.mode} ---\n{text}\n")
    st = res.stats
    print(json.dumps({"mode": args.mode, "prompts": len(prompts), "new_tokens": st.new_tokens, "forwards": st.forwards,
                      "tpf": round(st.tpf, 4), "acceptance_length": round(st.acceptance_length, 4),
                      "draft_len": res.settings.draft_len, "tokens_per_s": round(st.tokens_per_s, 2),
                      "wall_s": round(st.wall_s, 3)}, indent=2))
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from nld_lora.data import CollectConfig, collect, read_prompts
    from nld_lora.parallel import make_accelerator

    cfg = _settings(CollectConfig, args)
    records, report = read_prompts(args.prompts, cfg.fields, skip_bad=cfg.skip_bad, limit=cfg.limit)
    _writable(args.out)
    accelerator = make_accelerator(cpu=None if args.device is None else args.device == "cpu")
    model = _load(args).to(accelerator.device)
    summary = collect(model, records, args.out, cfg, accelerator=accelerator)
    if accelerator.is_main_process:
        skipped = dict(summary.skipped)
        if report.skipped:
            skipped.update({f"read_{k}": v for k, v in report.skipped.items()})
        print(json.dumps({"out": str(Path(args.out)), "prompts": summary.prompts_total,
                          "already_done": summary.done_before, "generated": summary.generated,
                          "skipped": skipped, "truncated": summary.truncated,
                          "thinking_capped": summary.thinking_capped, "target_tokens": summary.target_tokens,
                          "wall_s": round(summary.wall_s, 2)}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    import nld_lora
    from nld_lora.data.collect import collection_meta
    from nld_lora.train import TrainConfig, train

    cfg = _settings(TrainConfig, args)
    cfg.validate()
    collection_meta(Path(args.data), cfg.allow_incomplete_data)
    _writable(args.out)
    model = nld_lora.load(args.model, dtype=args.dtype, device=args.device, wrap=args.wrap,
                          quantization=cfg.quantization)
    res = train(model, args.data, args.out, cfg)
    if not PartialState().is_main_process:
        return 0
    print(json.dumps({"adapter": res.adapter_dir, "steps": res.steps, "best_step": res.best_step,
                      "simulated_acceptance_before": round(res.baseline_simulated_acceptance, 4),
                      "simulated_acceptance_after": round(res.best_simulated_acceptance, 4),
                      "deployed_acceptance_before": res.deployed_baseline and round(res.deployed_baseline, 4),
                      "deployed_acceptance_after": res.deployed_best and round(res.deployed_best, 4),
                      "wall_s": round(res.wall_s, 1), "processes": res.world_size,
                      "parallelism": res.parallelism}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from nld_lora.evaluation.runner import EvalConfig, evaluate, read_eval_records

    cfg = _settings(EvalConfig, args)
    if not cfg.tasks and not args.prompts:
        raise ValueError("eval: give --prompts EVAL.jsonl, or tasks=... (lm-evaluation-harness), or both")
    if args.prompts:
        read_eval_records(args.prompts, cfg.limit)
    _writable(args.out)
    model = _load(args)
    name = model.attach_adapter(args.adapter, other_base=args.adapter_other_base) if args.adapter else None
    if cfg.tasks:
        from nld_lora.evaluation.lm_eval_backend import run_tasks
        from nld_lora.modes import mode_plan

        plans = mode_plan(adapters={"self_spec+adapter": name} if name else None,
                          diffusion={"diffusion": {}} if cfg.diffusion else None)
        scores = run_tasks(model, cfg.tasks, plans=plans, include_path=cfg.task_dir, limit=cfg.task_limit,
                           batch_size=cfg.batch_size)
        (Path(args.out) / "tasks.json").write_text(json.dumps(scores, indent=2, default=float) + "\n")
        print(json.dumps(scores, indent=2, default=float))
        if not args.prompts:
            return 0
    result = evaluate(model, args.prompts, args.out, cfg, adapter=name)
    print((Path(args.out) / "eval.md").read_text())
    if any(not m["identical_to_ar"] for k, m in result["modes"].items() if k.startswith("self_spec")) \
            and cfg.decode.temperature <= 0:
        print("nld-lora eval: error: greedy self-speculation emitted other tokens than AR (a bug)", file=sys.stderr)
        return 3
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from nld_lora.data.readers import read_prompts
    from nld_lora.report import ReportConfig, build_report, headline

    cfg = _settings(ReportConfig, args)
    read_prompts(args.prompts, limit=cfg.limit)
    _writable(args.out)
    model = _load(args)
    report = build_report(model, args.adapter or [], args.prompts, args.out, cfg,
                          other_base=args.adapter_other_base)
    print(headline(report))
    print(f"report: {Path(args.out) / 'report.md'}")
    if args.strict and report["lossless"]["mismatches"]:
        print(f"nld-lora report: error: lossless check failed on {report['lossless']['mismatches']} prompts "
              "(greedy self-speculation differs from AR)", file=sys.stderr)
        return 3
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nld_lora.adapter.saving import export_adapter
    from nld_lora.model.export import export_ar_view, export_release_layout

    if args.release_layout:
        if args.ar_view or args.into:
            raise ValueError("export --release-layout OUT takes --model and optionally --adapter, not --into/--ar-view")
        out, missing = export_release_layout(args.model, args.release_layout, adapter=args.adapter, wrap=args.wrap)
        print(json.dumps({"release_layout": str(out), "adapter": args.adapter, "remote_code_missing": missing}))
        if missing:
            print(f"note: NVIDIA's loader also needs {', '.join(missing)} from the release repository in {out} "
                  "(AutoModel.from_pretrained(..., trust_remote_code=True))", file=sys.stderr)
        return 0
    if bool(args.adapter) == bool(args.ar_view):
        raise ValueError("export: give --adapter A --into MODEL_DIR, --ar-view OUT, or --release-layout OUT "
                         "(each with --model)")
    if args.adapter:
        if not args.into:
            raise ValueError("export --adapter needs --into MODEL_DIR")
        print(json.dumps({"adapter": str(export_adapter(args.adapter, args.into))}))
    else:
        print(json.dumps({"ar_view": str(export_ar_view(args.model, args.ar_view))}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nld_lora.data.collect import CollectConfig
    from nld_lora.evaluation.runner import EvalConfig
    from nld_lora.report import ReportConfig
    from nld_lora.train import TrainConfig

    parser = argparse.ArgumentParser(prog="nld-lora", description="Draft-pathway LoRA for tri-mode LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode prompts in one mode and print the stats")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (\\n for newlines)")
    src.add_argument("--prompt-file", help="any prompt file nld-lora reads (jsonl, csv, txt, ...)")
    g.add_argument("--mode", choices=list(MODES), default="self_spec")
    g.add_argument("--adapter", action="append", help="PEFT adapter folder (repeatable; the last is active)")
    g.add_argument("--quiet", action="store_true", help="print only the stats")
    _add_adapter_base_arg(g)
    _add_settings_args(g, "max_new_tokens=64 decode.draft_len=7 decode.temperature=0.7", GenerateConfig)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("collect", help="stage 1: the model's own AR answers to your prompts (resumable)")
    _add_model_args(c)
    c.add_argument("--prompts", required=True, help="jsonl/json/csv/parquet/txt file, folder, datasets folder or hub")
    c.add_argument("--out", required=True)
    _add_settings_args(c, "max_new_tokens=256 use_chat_template=true fields.prompt=question thinking=cap "
                          "max_thinking_tokens=512 backend=vllm", CollectConfig)
    c.set_defaults(func=cmd_collect)

    t = sub.add_parser("train", help="stage 2: train the draft-pathway LoRA on collected targets (resumable)")
    _add_model_args(t)
    t.add_argument("--data", required=True, help="output folder of `nld-lora collect`")
    t.add_argument("--out", required=True)
    _add_settings_args(t, "lora.r=32 steps=200", TrainConfig)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("report", help="stage 3: before/after acceptance report on held-out prompts")
    _add_model_args(r)
    r.add_argument("--adapter", action="append", help="adapter folder (repeat to compare several)")
    r.add_argument("--prompts", required=True)
    r.add_argument("--out", default="runs/report")
    _add_adapter_base_arg(r)
    r.add_argument("--strict", action="store_true", help="exit 3 when the lossless check finds a mismatch")
    _add_settings_args(r, "max_new_tokens=96 decode.block_size=16 limit=200 diffusion=false lora_mode=both",
                       ReportConfig)
    r.set_defaults(func=cmd_report)

    v = sub.add_parser("eval", help="accuracy, latency and cost of every mode on eval prompts (eval.json/.md)")
    _add_model_args(v)
    v.add_argument("--adapter", help="adapter folder for the self_spec+adapter mode")
    v.add_argument("--prompts", help="JSONL records: prompt + reference | answer | test+entry_point")
    v.add_argument("--out", default="runs/eval")
    _add_adapter_base_arg(v)
    _add_settings_args(v, "max_new_tokens=128 cost.usd_per_hour=2.5 decode.block_size=8 latency_prompts=32",
                       EvalConfig)
    v.set_defaults(func=cmd_eval)

    e = sub.add_parser("export", help="put an adapter into a model folder, or write the model's AR view")
    e.add_argument("--adapter", help="trained adapter folder to install as MODEL_DIR/linear_spec_lora")
    e.add_argument("--into", help="model folder that receives the adapter (an existing one is kept aside)")
    e.add_argument("--ar-view", help="output folder for a plain Ministral3ForCausalLM copy of the AR pathway")
    e.add_argument("--release-layout", help="output folder for a copy in NVIDIA's release layout (config with "
                                            "auto_map, --adapter as linear_spec_lora/), for NVIDIA's own code")
    e.add_argument("--model", default=DEFAULT_MODEL, help="model folder or hub id (for --ar-view, --release-layout)")
    e.add_argument("--wrap", action="store_true", help="--model is a plain HF causal LM (for --release-layout)")
    e.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nld_lora.parallel import finish_processes

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ValueError, OSError) as err:
        print(f"nld-lora {args.command}: error: {err}", file=sys.stderr)
        finish_processes(barrier=False)
        return 2
    finish_processes()
    return code


if __name__ == "__main__":
    sys.exit(main())
