"""The pretraining loop: stage 1 AR only, stage 2 joint AR + alpha * diffusion over the dual-stream layout.

bf16 autocast, sequence packing, fixed seed, periodic checkpoints in cfg.work, exact resume.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Ministral3Config, PreTrainedTokenizerFast

from nld_lora.model import new_model
from nld_lora.model.loss import joint_loss
from nld_lora.pretrain.config import PretrainConfig
from nld_lora.pretrain.corpus import bytes_per_token, pack, train_tokenizer
from nld_lora.pretrain.evaluate import ar_loss, evaluate_base
from nld_lora.pretrain.schedule import Plan, batch_for, lr_at


def model_config(tokenizer, cfg: PretrainConfig) -> Ministral3Config:
    max_pos = cfg.max_positions
    return Ministral3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads, max_position_embeddings=max_pos,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0, "original_max_position_embeddings": max_pos,
            "max_position_embeddings": max_pos, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
        },
        mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, block_size=cfg.block_size, dlm_loss_weight=cfg.alpha, tie_word_embeddings=False,
    )


def _tokenizer(cfg: PretrainConfig, work: Path) -> PreTrainedTokenizerFast:
    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    tokenizer = train_tokenizer(Path(cfg.corpus) / "corpus_train.txt", cfg.vocab)
    tokenizer.save_pretrained(str(tok_dir))
    return tokenizer


def pretrain(cfg: PretrainConfig) -> dict:
    """Train (resuming from cfg.work), save the model to cfg.out with pretrain_metrics.json and pretrain_log.jsonl."""
    torch.manual_seed(cfg.seed)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(cfg, work)
    corpus = Path(cfg.corpus)
    train_rows = pack(tokenizer, corpus / "corpus_train.txt", cfg.seq_len)
    eval_rows = pack(tokenizer, corpus / "corpus_eval.txt", cfg.seq_len)
    eval_bpt = bytes_per_token(tokenizer, corpus / "corpus_eval.txt")
    print(f"train rows {len(train_rows)} x {cfg.seq_len}; eval {len(eval_rows)} rows; {eval_bpt:.2f} bytes/token")

    device = torch.device(cfg.device)
    train_rows = train_rows.to(device)
    model = new_model(model_config(tokenizer, cfg)).to(device).train()
    model.tokenizer = tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = Plan(cfg)
    ckpt = work / "state.pt"
    step, elapsed, log = 0, 0.0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed, log = state["step"], state["elapsed"], state["log"]
        if budget.on:  # the stage lengths a budget run has fixed so far; fixed-step runs keep the caller's
            cfg.ar_steps, cfg.joint_steps = state.get("plan", (cfg.ar_steps, cfg.joint_steps))
        torch.set_rng_state(state["rng"])
        print(f"resumed at step {step}")
    gen = torch.Generator(device=device)
    bar = tqdm(total=None if budget.on else cfg.total_steps, initial=step, desc="pretrain", unit="step")
    t0 = time.time() - elapsed
    while step < min(cfg.total_steps, cfg.stop_at_step or cfg.total_steps):
        ids = train_rows[batch_for(step, len(train_rows), cfg.batch, cfg.seed)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
            if step < cfg.ar_steps:
                loss = ar_loss(model, ids)
                parts = {"ar": loss.detach()}
            else:
                gen.manual_seed(cfg.seed * 100003 + step)
                out = joint_loss(model, ids, alpha=cfg.alpha, block_size=cfg.block_size, generator=gen)
                loss, parts = out.loss, {"ar": out.ar_loss.detach(), "diff": out.diff_loss.detach()}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if budget.resolve(step, time.time() - t0):
            bar.total = cfg.total_steps
        if step % 20 == 0:
            values = {k: float(v) for k, v in parts.items()}
            bar.set_postfix(stage=1 if step <= cfg.ar_steps else 2, **{k: f"{v:.3f}" for k, v in values.items()})
            log.append({"step": step, "lr": lr_at(step - 1, cfg), **values})
        if step % cfg.ckpt_every == 0 or step in (cfg.total_steps, cfg.stop_at_step):
            tmp = work / "state.pt.tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "elapsed": time.time() - t0, "log": log, "rng": torch.get_rng_state(),
                        "plan": (cfg.ar_steps, cfg.joint_steps)}, tmp)
            os.replace(tmp, ckpt)
    bar.close()
    if step < cfg.total_steps:  # stopped early on purpose: the checkpoint in cfg.work resumes it
        return {"stopped_at_step": step}
    wall = time.time() - t0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):
        metrics = evaluate_base(model.float(), eval_rows.to(device), eval_bpt, cfg.block_size)
    model.train()
    metrics.update({"wall_s": wall, "tokens_seen": cfg.total_steps * cfg.batch * cfg.seq_len,
                    "parameters": sum(p.numel() for p in model.parameters()), "args": asdict(cfg)})
    model.cpu().save_pretrained(cfg.out)
    (Path(cfg.out) / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (Path(cfg.out) / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return metrics
