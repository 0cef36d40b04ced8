"""`nld-lora collect|train|report|generate`: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="data/tiny-nld-code", help="NLD folder, hub id, or HF causal LM with --wrap")
    p.add_argument("--wrap", action="store_true", help="convert a plain causal LM (adds a mask token)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--device", default=None)


def _load(args: argparse.Namespace):
    import nld_lora

    return nld_lora.load(args.model, dtype=args.dtype, device=args.device, wrap=args.wrap)


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    for path in args.adapter or []:
        model.attach_adapter(path)
    if args.prompt_file:
        from nld_lora.data.readers import read_prompts

        records, _ = read_prompts(args.prompt_file, limit=args.limit)
        prompts = [r.prompt for r in records]
    else:
        prompts = [args.prompt.replace("\\n", "\n")]
    res = model.generate(prompts, mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         block_size=args.block_size, draft_len=args.draft_len, threshold=args.threshold,
                         batch_size=args.batch_size, seed=args.seed, progress=len(prompts) > 1)
    if not args.quiet:
        for prompt, text in zip(prompts, res.texts or [str(s) for s in res.sequences]):
            print(f"--- prompt ---\n{prompt}\n--- {args.mode} ---\n{text}\n")
    st = res.stats
    print(json.dumps({"mode": args.mode, "prompts": len(prompts), "new_tokens": st.new_tokens, "forwards": st.forwards,
                      "tpf": round(st.tpf, 4), "acceptance_length": round(st.acceptance_length, 4),
                      "tokens_per_s": round(st.tokens_per_s, 2), "wall_s": round(st.wall_s, 3)}, indent=2))
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from nld_lora.data import CollectConfig, FieldMap, collect, read_prompts

    accelerator = Accelerator(cpu=args.device == "cpu")
    model = _load(args).to(accelerator.device)
    fields = FieldMap(prompt=args.prompt_field, messages=args.messages_field, id=args.id_field)
    records, report = read_prompts(args.prompts, fields, skip_bad=args.skip_bad, limit=args.limit)
    cfg = CollectConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                        batch_size=args.batch_size, shard_size=args.shard_size, length_policy=args.length_policy,
                        max_prompt_tokens=args.max_prompt_tokens, system_prompt=args.system_prompt,
                        use_chat_template=args.use_chat_template, thinking=args.thinking,
                        max_thinking_tokens=args.max_thinking_tokens, end_think_token=args.end_think_token,
                        backend=args.backend, tensor_parallel_size=args.tensor_parallel_size)
    summary = collect(model, records, args.out, cfg, accelerator=accelerator)
    if accelerator.is_main_process:
        skipped = dict(summary.skipped)
        if report.skipped:
            skipped.update({f"read_{k}": v for k, v in report.skipped.items()})
        print(json.dumps({"out": str(Path(args.out)), "prompts": summary.prompts_total,
                          "already_done": summary.done_before, "generated": summary.generated,
                          "skipped": skipped, "truncated": summary.truncated,
                          "target_tokens": summary.target_tokens, "wall_s": round(summary.wall_s, 2)}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from nld_lora.config import load_config
    from nld_lora.train import TrainConfig, train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    res = train(args.model, args.data, args.out, cfg)
    if not PartialState().is_main_process:
        return 0
    print(json.dumps({"adapter": res.adapter_dir, "steps": res.steps, "best_step": res.best_step,
                      "simulated_acceptance_before": round(res.baseline_simulated_acceptance, 4),
                      "simulated_acceptance_after": round(res.best_simulated_acceptance, 4),
                      "wall_s": round(res.wall_s, 1), "processes": res.world_size}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from nld_lora.report import ReportConfig, build_report, headline

    model = _load(args)
    cfg = ReportConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
                       block_size=args.block_size, draft_len=args.draft_len, limit=args.limit,
                       speed_prompts=args.speed_prompts, diffusion=not args.no_diffusion, seed=args.seed,
                       lora_mode=args.lora_mode, system_prompt=args.system_prompt,
                       use_chat_template=args.use_chat_template)
    report = build_report(model, args.adapter or [], args.prompts, args.out, cfg)
    print(headline(report))
    print(f"report: {Path(args.out) / 'report.md'}")
    if args.strict and report["lossless"]["mismatches"]:
        print(f"nld-lora report: error: lossless check failed on {report['lossless']['mismatches']} prompts "
              "(greedy self-speculation differs from AR)", file=sys.stderr)
        return 3
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nld_lora.model.export import export_adapter, export_ar_view

    if bool(args.adapter) == bool(args.ar_view):
        raise ValueError("export: give either --adapter A --into MODEL_DIR, or --ar-view OUT (with --model)")
    if args.adapter:
        if not args.into:
            raise ValueError("export --adapter needs --into MODEL_DIR")
        print(json.dumps({"adapter": str(export_adapter(args.adapter, args.into))}))
    else:
        print(json.dumps({"ar_view": str(export_ar_view(args.model, args.ar_view))}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nld-lora", description="Draft-pathway LoRA for tri-mode LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode prompts in one mode and print the stats")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (\\n for newlines)")
    src.add_argument("--prompt-file", help="any prompt file nld-lora reads (jsonl, csv, txt, ...)")
    g.add_argument("--mode", choices=["ar", "diffusion", "self_spec"], default="self_spec")
    g.add_argument("--adapter", action="append", help="PEFT adapter folder (repeatable; the last is active)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--draft-len", type=int, default=None)
    g.add_argument("--threshold", type=float, default=0.9)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--limit", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="print only the stats")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("collect", help="stage 1: the model's own AR answers to your prompts (resumable)")
    _add_model_args(c)
    c.add_argument("--prompts", required=True, help="jsonl/json/csv/parquet/txt file, folder, datasets folder or hub")
    c.add_argument("--out", required=True)
    c.add_argument("--prompt-field", default="prompt")
    c.add_argument("--messages-field", default="messages")
    c.add_argument("--id-field", default="id")
    c.add_argument("--system-prompt", default=None)
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--shard-size", type=int, default=64)
    c.add_argument("--max-prompt-tokens", type=int, default=None)
    c.add_argument("--length-policy", choices=["skip", "truncate_left"], default="skip")
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--skip-bad", action="store_true", help="skip and count malformed rows instead of failing")
    c.add_argument("--use-chat-template", action="store_true", default=None,
                   help="send plain prompts as user messages through the tokenizer's chat template")
    c.add_argument("--thinking", choices=["keep", "cap"], default="keep",
                   help="reasoning text in targets: keep as generated, or cap at --max-thinking-tokens")
    c.add_argument("--max-thinking-tokens", type=int, default=None)
    c.add_argument("--end-think-token", default="[/THINK]")
    c.add_argument("--backend", choices=["runtime", "vllm"], default="runtime")
    c.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm backend: GPUs (default: all)")
    c.set_defaults(func=cmd_collect)

    t = sub.add_parser("train", help="stage 2: train the draft-pathway LoRA on collected targets (resumable)")
    t.add_argument("--model", default="data/tiny-nld-code")
    t.add_argument("--data", required=True, help="output folder of `nld-lora collect`")
    t.add_argument("--out", required=True)
    t.add_argument("--config", default=None, help="YAML with TrainConfig keys")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lora.r=32 steps=200")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("report", help="stage 3: before/after acceptance report on held-out prompts")
    _add_model_args(r)
    r.add_argument("--adapter", action="append", help="adapter folder (repeat to compare several)")
    r.add_argument("--prompts", required=True)
    r.add_argument("--out", default="report")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--speed-prompts", type=int, default=32, help="prompts re-timed at batch size 1")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--block-size", type=int, default=None)
    r.add_argument("--draft-len", type=int, default=None)
    r.add_argument("--limit", type=int, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-diffusion", action="store_true", help="skip the native diffusion run")
    r.add_argument("--system-prompt", default=None)
    r.add_argument("--use-chat-template", action="store_true", default=None,
                   help="render prompts as collection did with --use-chat-template")
    r.add_argument("--lora-mode", choices=["draft_only", "both"], default="draft_only",
                   help="'both' also applies the adapter to verify (not lossless; the check will say so)")
    r.add_argument("--strict", action="store_true", help="exit 3 when the lossless check finds a mismatch")
    r.set_defaults(func=cmd_report)

    e = sub.add_parser("export", help="put an adapter into a model folder, or write the model's AR view")
    e.add_argument("--adapter", help="trained adapter folder to install as MODEL_DIR/linear_spec_lora")
    e.add_argument("--into", help="model folder that receives the adapter (an existing one is kept aside)")
    e.add_argument("--ar-view", help="output folder for a plain Ministral3ForCausalLM copy of the AR pathway")
    e.add_argument("--model", default="data/tiny-nld-code", help="NLD folder or hub id (for --ar-view)")
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
