"""Held-out measures of a base: AR loss (per token and per byte) and denoising accuracy at fixed mask ratios."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nld_lora.model.loss import dual_stream_forward


def ar_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy of full rows (the backbone's own causal mask)."""
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    logits, _ = model(ids, position_ids=pos)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def evaluate_base(model, rows: torch.Tensor, bytes_per_token: float, block: int, max_rows: int = 64) -> dict:
    was_training = model.training
    model.eval()
    rows = rows[: min(len(rows), max_rows)]
    losses = [float(ar_loss(model, rows[i:i + 16])) for i in range(0, len(rows), 16)]
    loss = sum(losses) / len(losses)
    acc = {}
    gen = torch.Generator().manual_seed(123)
    for ratio in (0.15, 0.5, 0.9, 1.0):
        correct = total = 0
        for i in range(0, len(rows), 16):
            x0 = rows[i:i + 16]
            masked = (torch.rand(x0.shape, generator=gen) < ratio).to(x0.device)
            xt = torch.where(masked, torch.full_like(x0, model.mask_token_id), x0)
            noisy, _ = dual_stream_forward(model, xt, x0, block)
            correct += int((noisy.argmax(-1) == x0)[masked].sum())
            total += int(masked.sum())
        acc[f"{ratio:.2f}"] = correct / max(total, 1)
    model.train(was_training)
    return {"ar_loss_per_token": loss, "ar_ppl_per_token": math.exp(loss),
            "ar_loss_nats_per_byte": loss / bytes_per_token, "denoise_accuracy": acc}
