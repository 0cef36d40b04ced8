"""Scale check: a random-weight model of a named NLD shape, in the release layout, loaded and run for real.

    python scripts/scale_check.py --shape 1b            # CPU: about 10 minutes on 2 cores
    python scripts/scale_check.py --shape 1b --qlora    # CPU: bf16 and 4-bit QLoRA (NF4, bitsandbytes) rows
    python scripts/scale_check.py --shape 8b --qlora    # GPU: the same at the released 8B shape

Prints one table: weights size, load time and peak host memory during load (vs the weights' size in their dtype;
safetensors maps the shards, so a weight page becomes resident when a forward first reads it: the next column, the
peak through the forwards, is the resident model),
per-mode forward cost (AR step, draft block, verify block at draft length 31 after a prompt), and one LoRA
training step on the draft pathway (o_proj, r 128, alpha 512) with its time and peak memory. Each measurement
runs in a fresh process, so peak memory belongs to that run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    """VmHWM: the peak resident set since the process started or since _reset_peak()."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM to the current resident set


def _median_s(fn, reps: int) -> float:
    import torch

    fn()  # warm-up
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def training_run(model, vocab: int, draft_len: int, seq_len: int, blocks: int, out: Path):
    """The trainer's own run state for the default recipe's training settings (follow-up blocks, first-position
    weight), at NLD's adapter shape (o_proj, r 128, alpha 512) and one random sequence of seq_len tokens."""
    import dataclasses

    import torch

    from nld_lora.adapter.attach import add_lora
    from nld_lora.config_io import load_config
    from nld_lora.recipe import RecipeConfig
    from nld_lora.train.config import LoraSettings
    from nld_lora.train.data import Sequence
    from nld_lora.train.trainer import TrainingRun, TrainState, setup_accelerator, setup_optimization

    default = load_config(RecipeConfig, Path(__file__).resolve().parents[1] / "recipes/configs/tiny_code.yaml").train
    cfg = dataclasses.replace(default, lora=LoraSettings(r=128, alpha=512, target_modules=["o_proj"]),
                              draft_len=draft_len, batch_size=1, grad_accum=1, blocks_per_seq=blocks,
                              max_seq_len=seq_len)
    accelerator = setup_accelerator(cfg, out)
    peft_model = add_lora(model, cfg)
    wrapped, optimizer, scheduler, params = setup_optimization(model, cfg, accelerator)
    seq = Sequence(torch.randint(200, vocab, (seq_len,)).tolist(), seq_len // 4, "random")
    return TrainingRun(cfg=cfg, out=out, accelerator=accelerator, model=model, peft=peft_model, wrapped=wrapped,
                       optimizer=optimizer, scheduler=scheduler, params=params, train_seqs=[seq], eval_seqs=[],
                       fit_seqs=[], draft_len=draft_len, state=TrainState())


def measure(folder: str, dtype: str, device: str, quantization: str | None, prompt_len: int, draft_len: int,
            reps: int, train_seq_len: int, train_blocks: int) -> dict:
    """Runs in its own process: load, forward costs, one training step; returns the figures."""
    import torch

    import nld_lora
    from nld_lora.decoding.batch import DecodeBatch
    from nld_lora.decoding.stats import RequestStats
    from nld_lora.testing.release_fixture import write_release_folder
    from nld_lora.train.trainer import train_step

    warm = Path(folder).parent / "warm-up-tiny"
    if not (warm / "config.json").exists():
        write_release_folder(warm, "tiny", adapter=False)
    nld_lora.load(str(warm))  # the first load imports ~1600 library modules (~0.2 GiB): not the weights' memory
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    stored = sum(p.stat().st_size for p in Path(folder).glob("model*.safetensors"))
    _reset_peak()
    base = _rss_now()
    t0 = time.perf_counter()
    model = nld_lora.load(folder, dtype=dtype, device=device, quantization=quantization)
    load_s = time.perf_counter() - t0
    load_peak = _rss_peak() - base
    stored_dtype = getattr(torch, json.loads((Path(folder) / "config.json").read_text())["dtype"])
    ratio = torch.empty((), dtype=model.dtype).element_size() / torch.empty((), dtype=stored_dtype).element_size()
    weights = int(stored * ratio) if quantization is None else stored  # the weights' size in the loaded dtype
    out = {"weights_gib": weights / GIB, "load_s": load_s, "load_peak_host_gib": load_peak / GIB,
           "load_peak_vs_weights": load_peak / weights, "dtype": str(model.dtype).removeprefix("torch."),
           "quantization": quantization or "none", "device": device,
           "params_b": sum(p.numel() for p in model.parameters()) / 1e9}

    vocab = model.config.vocab_size
    prompt = torch.randint(200, vocab, (prompt_len,)).tolist()
    stats = [RequestStats()]
    capacity = prompt_len + draft_len + 1
    batch = DecodeBatch(model, [prompt], [0], stats, capacity=capacity)
    tokens = torch.randint(200, vocab, (1, draft_len + 1), device=model.device)

    def run(q: int, kind: str, rows) -> None:
        batch.forward(tokens[:, :q], kind, logits_index=rows)  # not advanced: the next call overwrites it

    with torch.no_grad():
        out["prefill_s"] = _median_s(lambda: DecodeBatch(model, [prompt], [0], stats, capacity=capacity).prefill(), max(1, reps // 2))
        batch.prefill()
        out["ar_step_s"] = _median_s(lambda: run(1, "ar", None), reps)
        out["draft_block_s"] = _median_s(lambda: run(draft_len + 1, "draft", slice(1, None)), reps)
        out["verify_block_s"] = _median_s(lambda: run(draft_len + 1, "verify", None), reps)
    out["forward_peak_host_gib"] = (_rss_peak() - base) / GIB

    trainer = training_run(model, vocab, draft_len, train_seq_len, train_blocks, Path(folder).parent / "train")
    out["lora_params_m"] = sum(p.numel() for p in trainer.params) / 1e6
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        train_step(trainer)
        trainer.state.step += 1

    out["train_step_s"] = _median_s(step, max(1, reps // 2))
    out["train_peak_host_gib"] = (_rss_peak() - base) / GIB
    out["resident_after_train_gib"] = (_rss_now() - base) / GIB
    if cuda:
        out["train_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out


def _fmt(rows: list[dict], shape: str, args: argparse.Namespace) -> str:
    lines = [f"Scale check, shape `{shape}` ({rows[0]['params_b']:.2f}B parameters), prompt {args.prompt_len} "
             f"tokens, draft length {args.draft_len}; training step: 1 sequence of {args.train_seq_len} tokens, "
             f"{args.train_blocks} draft blocks, LoRA o_proj r128 a512, the trainer's step with the default "
             "recipe's objective (follow-up blocks, first-position weight).", "",
             "| dtype | weights GiB | load s | peak host during load GiB (x weights) | peak host through forwards "
             "GiB (x weights) | prefill s | AR step ms | draft block ms | verify block ms | LoRA params M "
             "| train step s | peak host train GiB | resident host after train GiB | peak GPU train GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gpu = f"{r['train_peak_gpu_gib']:.2f}" if "train_peak_gpu_gib" in r else "-"
        name = r["dtype"] + ("" if r["quantization"] == "none" else f" + {r['quantization']}")
        lines.append(
            f"| {name} | {r['weights_gib']:.2f} | {r['load_s']:.1f} | {r['load_peak_host_gib']:.2f} "
            f"({r['load_peak_vs_weights']:.2f}x) | {r['forward_peak_host_gib']:.2f} "
            f"({r['forward_peak_host_gib'] / r['weights_gib']:.2f}x) | {r['prefill_s']:.2f} | {1000 * r['ar_step_s']:.0f} | "
            f"{1000 * r['draft_block_s']:.0f} | {1000 * r['verify_block_s']:.0f} | {r['lora_params_m']:.1f} | "
            f"{r['train_step_s']:.2f} | {r['train_peak_host_gib']:.2f} | {r['resident_after_train_gib']:.2f} | {gpu} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", help="tiny | 1b | 3b | 8b")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the written weights")
    p.add_argument("--load-dtypes", default=None,
                   help="comma list of dtypes to load them in (default: --dtype); a cast makes real copies")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--qlora", action="store_true", help="add a 4-bit QLoRA row (NF4 base, bf16 head and LoRA)")
    p.add_argument("--workdir", default="/tmp/nld_scale_check", help="where the random-weight folder is written")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--draft-len", type=int, default=31)
    p.add_argument("--train-seq-len", type=int, default=512)
    p.add_argument("--train-blocks", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quantization", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        res = measure(args.measure, args.dtype, args.device, args.quantization, args.prompt_len, args.draft_len,
                      args.reps, args.train_seq_len, args.train_blocks)
        print("SCALE_CHECK " + json.dumps(res))
        return

    import torch

    from nld_lora.testing.release_fixture import write_release_folder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(args.workdir) / f"nld-{args.shape}-{args.dtype}"
    if not (folder / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        write_release_folder(folder, args.shape, dtype=args.dtype, adapter=False, min_shards=4)
        print(f"wrote {folder} in {time.perf_counter() - t:.0f}s", flush=True)
    rows = []
    plans = [(d, None) for d in (args.load_dtypes or args.dtype).split(",")]
    plans += [(args.dtype, "4bit")] if args.qlora else []
    for load_dtype, quant in plans:
        cmd = [sys.executable, __file__, "--measure", str(folder), "--dtype", load_dtype, "--device", device,
               "--prompt-len", str(args.prompt_len), "--draft-len", str(args.draft_len), "--reps", str(args.reps),
               "--train-seq-len", str(args.train_seq_len), "--train-blocks", str(args.train_blocks)]
        if quant:
            cmd += ["--quantization", quant]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("SCALE_CHECK ")), None)
        if done.returncode != 0 or line is None:
            sys.exit(f"scale_check: measurement failed ({load_dtype} {quant or ''}):\n{done.stderr[-3000:]}")
        rows.append(json.loads(line.removeprefix("SCALE_CHECK ")))
    print(_fmt(rows, args.shape, args))
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
