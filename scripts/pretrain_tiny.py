"""Pretrain the embedded tiny tri-mode base (tokenizer + Ministral3 model) with NLD's two-stage recipe.

Stage 1: AR only. Stage 2: joint AR + alpha * diffusion (alpha 0.3) over the dual-stream layout.
bf16 autocast, sequence packing, fixed seed, periodic checkpoints, exact resume.
Run `python scripts/make_domain_data.py` first (it writes the corpus).

On a GPU the defaults are the shipped model's schedule (1200 + 1600 steps of 16 x 512 tokens; 76 s on an H200).
On a CPU without explicit step counts the run is a 60-minute wall-clock budget instead (--minutes), 40% of it AR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import Ministral3Config, PreTrainedTokenizerFast

from nld_lora.model import new_model
from nld_lora.model.loss import joint_loss
from nld_lora.model.masks import dual_stream_mask, dual_stream_positions

SPECIALS = ["<pad>", "<eos>", "<|mask|>"]
DEFAULT_STEPS = (1200, 1600)  # (stage 1, stage 2): the shipped model's schedule
CPU_MINUTES = 60.0
DOC_SEPARATOR = "\n\x00\n"


def train_tokenizer(corpus: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = corpus.read_text(encoding="utf-8").split(DOC_SEPARATOR)
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", mask_token="<|mask|>", model_max_length=1024,
    )


def pack(tokenizer: PreTrainedTokenizerFast, corpus: Path, seq_len: int) -> torch.Tensor:
    """Tokenize every document, join with EOS, cut into (n, seq_len) rows."""
    ids: list[int] = []
    for doc in corpus.read_text(encoding="utf-8").split(DOC_SEPARATOR):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def model_config(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> Ministral3Config:
    max_pos = args.max_positions
    return Ministral3Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max_pos,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0, "original_max_position_embeddings": max_pos,
            "max_position_embeddings": max_pos, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
        },
        mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, block_size=args.block_size, dlm_loss_weight=args.alpha, tie_word_embeddings=False,
    )


def total_steps(args: argparse.Namespace) -> int:
    """Stage 1 + stage 2 steps (a budget run fixes them while it trains)."""
    return args.ar_steps + args.joint_steps


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Warmup-stable-decay: linear warmup, constant through stage 1, cosine decay to 10% over stage 2."""
    total = total_steps(args)
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if step < args.ar_steps:
        return args.lr
    frac = (step - args.ar_steps) / max(total - args.ar_steps, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class Plan:
    """Wall-clock budget (--minutes): stage 1 ends at --ar-fraction of the budget; stage 2's step count is set
    from the speed of PROBE of its steps so that training, with its full LR decay, ends on time."""

    PROBE = 50
    UNSET = 10**9

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.on = args, args.minutes is not None
        self.probe_start: tuple[int, float] | None = None
        if self.on:
            args.ar_steps, args.joint_steps = self.UNSET, self.UNSET

    def resolve(self, step: int, elapsed_s: float) -> bool:
        """Fix a stage length once it is known; True when the plan changed."""
        if not self.on:
            return False
        args, budget_s = self.args, self.args.minutes * 60
        if args.ar_steps == self.UNSET:
            if elapsed_s < args.ar_fraction * budget_s:
                return False
            args.ar_steps = step
            return True
        if args.joint_steps != self.UNSET:
            return False
        if self.probe_start is None:
            self.probe_start = (step, elapsed_s)
        elif step == self.probe_start[0] + self.PROBE:
            per_step = (elapsed_s - self.probe_start[1]) / self.PROBE
            args.joint_steps = step - args.ar_steps + max(int((budget_s - elapsed_s) / per_step), 0)
            return True
        return False


def batch_for(step: int, rows: int, batch: int, seed: int) -> torch.Tensor:
    """Row indices of a step: a seeded permutation per epoch, so resume replays the same order."""
    per_epoch = rows // batch
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[offset * batch:(offset + 1) * batch]


def ar_loss(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    logits, _ = model(ids, position_ids=pos)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, data: torch.Tensor, tokenizer, eval_bytes_per_token: float, block: int) -> dict:
    """Held-out AR loss (per token and per byte) and denoising accuracy at fixed mask ratios."""
    model.eval()
    rows = data[: min(len(data), 64)]
    losses = [float(ar_loss(model, rows[i:i + 16])) for i in range(0, len(rows), 16)]
    loss = sum(losses) / len(losses)
    acc = {}
    gen = torch.Generator().manual_seed(123)
    length = rows.shape[1]
    for ratio in (0.15, 0.5, 0.9, 1.0):
        correct = total = 0
        for i in range(0, len(rows), 16):
            x0 = rows[i:i + 16]
            masked = (torch.rand(x0.shape, generator=gen) < ratio).to(x0.device)
            xt = torch.where(masked, torch.full_like(x0, model.mask_token_id), x0)
            mask = dual_stream_mask(length, block, x0.device).expand(len(x0), -1, -1, -1)
            logits, _ = model(torch.cat([xt, x0], 1), attention_mask=mask,
                              position_ids=dual_stream_positions(length, len(x0), x0.device))
            pred = logits[:, :length].argmax(-1)
            correct += int((pred == x0)[masked].sum())
            total += int(masked.sum())
        acc[f"{ratio:.2f}"] = correct / max(total, 1)
    model.train()
    return {"ar_loss_per_token": loss, "ar_ppl_per_token": math.exp(loss),
            "ar_loss_nats_per_byte": loss / eval_bytes_per_token, "denoise_accuracy": acc}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--corpus", default=".cache/corpus")
    p.add_argument("--out", default="data/tiny-nld-code")
    p.add_argument("--work", default=".cache/pretrain", help="checkpoints for resume")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=640)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--ar-steps", type=int, default=None, help=f"stage 1 steps (default {DEFAULT_STEPS[0]})")
    p.add_argument("--joint-steps", type=int, default=None, help=f"stage 2 steps (default {DEFAULT_STEPS[1]})")
    p.add_argument("--minutes", type=float, default=None,
                   help="train for this wall-clock budget instead of fixed step counts (the counts reached are saved "
                        f"in pretrain_metrics.json, so the run can be repeated by steps); default {CPU_MINUTES} on a "
                        "CPU when no step counts are given")
    p.add_argument("--ar-fraction", type=float, default=0.4, help="share of --minutes spent in stage 1 (AR only)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-autocast", action="store_true", help="train in fp32")
    args = p.parse_args()
    if args.minutes is None and args.ar_steps is None and args.joint_steps is None and args.device == "cpu":
        args.minutes = CPU_MINUTES
    args.ar_steps = DEFAULT_STEPS[0] if args.ar_steps is None else args.ar_steps
    args.joint_steps = DEFAULT_STEPS[1] if args.joint_steps is None else args.joint_steps

    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        tokenizer = train_tokenizer(Path(args.corpus) / "corpus_train.txt", args.vocab)
        tokenizer.save_pretrained(str(tok_dir))
    train_rows = pack(tokenizer, Path(args.corpus) / "corpus_train.txt", args.seq_len)
    eval_text = (Path(args.corpus) / "corpus_eval.txt").read_text(encoding="utf-8")
    eval_rows = pack(tokenizer, Path(args.corpus) / "corpus_eval.txt", args.seq_len)
    eval_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in eval_text.split(DOC_SEPARATOR))
    bytes_per_token = len(eval_text.replace(DOC_SEPARATOR, "").encode()) / eval_tokens
    print(f"train rows {len(train_rows)} x {args.seq_len}; eval {len(eval_rows)} rows; {bytes_per_token:.2f} bytes/token")

    device = torch.device(args.device)
    train_rows = train_rows.to(device)
    model = new_model(model_config(tokenizer, args)).to(device).train()
    model.tokenizer = tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = Plan(args)
    ckpt = work / "state.pt"
    step, elapsed, log = 0, 0.0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed, log = state["step"], state["elapsed"], state["log"]
        if budget.on:  # the stage lengths a budget run has fixed so far; fixed-step runs take the command line's
            args.ar_steps, args.joint_steps = state.get("plan", (args.ar_steps, args.joint_steps))
        torch.set_rng_state(state["rng"])
        print(f"resumed at step {step}")
    autocast = not args.no_autocast
    gen = torch.Generator(device=device)
    bar = tqdm(total=None if budget.on else total_steps(args), initial=step, desc="pretrain", unit="step")
    t0 = time.time() - elapsed
    while step < total_steps(args):
        ids = train_rows[batch_for(step, len(train_rows), args.batch, args.seed)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if step < args.ar_steps:
                loss = ar_loss(model, ids)
                parts = {"ar": loss.detach()}
            else:
                gen.manual_seed(args.seed * 100003 + step)
                out = joint_loss(model, ids, alpha=args.alpha, block_size=args.block_size, generator=gen)
                loss, parts = out.loss, {"ar": out.ar_loss.detach(), "diff": out.diff_loss.detach()}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if budget.resolve(step, time.time() - t0):
            bar.total = total_steps(args)
        if step % 20 == 0:
            values = {k: float(v) for k, v in parts.items()}
            bar.set_postfix(stage=1 if step <= args.ar_steps else 2, **{k: f"{v:.3f}" for k, v in values.items()})
            log.append({"step": step, "lr": lr_at(step - 1, args), **values})
        if step % args.ckpt_every == 0 or step == total_steps(args):
            tmp = work / "state.pt.tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "elapsed": time.time() - t0, "log": log, "rng": torch.get_rng_state(),
                        "plan": (args.ar_steps, args.joint_steps)}, tmp)
            os.replace(tmp, ckpt)
    bar.close()
    wall = time.time() - t0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):
        metrics = evaluate(model.float(), eval_rows.to(device), tokenizer, bytes_per_token, args.block_size)
    metrics.update({
        "wall_s": wall, "tokens_seen": total_steps(args) * args.batch * args.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()), "args": vars(args),
    })
    model.cpu().save_pretrained(args.out)
    (Path(args.out) / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (Path(args.out) / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    print(json.dumps({k: v for k, v in metrics.items() if k != "args"}, indent=2))


if __name__ == "__main__":
    main()
