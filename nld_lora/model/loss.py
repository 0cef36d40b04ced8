"""Joint objective L = L_AR + alpha * L_diff computed in ONE forward over the dual-stream input [x_t | x_0]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nld_lora.model.masks import dual_stream_mask, dual_stream_positions
from nld_lora.model.trimode import TriModeModel


@dataclass
class JointLoss:
    loss: torch.Tensor
    ar_loss: torch.Tensor
    diff_loss: torch.Tensor
    n_ar_tokens: int
    n_masked_tokens: int


def sample_noise(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    block_size: int,
    eps: float = 1e-3,
    per_block: bool = False,
    eligible: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask tokens i.i.d. with p = (1 - eps) t + eps, t ~ U(0,1) per sequence (or per block).

    Returns (x_t, masked bool, p per token).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if per_block:
        n_blocks = -(-length // block_size)
        t = torch.rand(batch, n_blocks, generator=generator, device=device)
        t = t.repeat_interleave(block_size, dim=1)[:, :length]
    else:
        t = torch.rand(batch, 1, generator=generator, device=device).expand(batch, length)
    p = (1 - eps) * t + eps
    masked = torch.rand(batch, length, generator=generator, device=device) < p
    if eligible is not None:
        masked &= eligible
    x_t = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return x_t, masked, p


def dual_stream_forward(model: TriModeModel, x_t: torch.Tensor, x_0: torch.Tensor,
                        block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over [x_t | x_0] with the training mask and shared positions: (noisy-half diffusion logits,
    clean-half causal logits)."""
    batch, length = x_0.shape
    mask = dual_stream_mask(length, block_size, x_0.device).expand(batch, -1, -1, -1)
    logits, _ = model(torch.cat([x_t, x_0], dim=1), attention_mask=mask,
                      position_ids=dual_stream_positions(length, batch, x_0.device))
    return logits[:, :length], logits[:, length:]


def joint_loss(
    model: TriModeModel,
    input_ids: torch.Tensor,
    *,
    alpha: float = 0.3,
    block_size: int | None = None,
    eps: float = 1e-3,
    per_block: bool = False,
    loss_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> JointLoss:
    """One forward over [x_t | x_0] (length 2L, shared positions).

    AR: shifted CE on the clean half. Diffusion: CE on masked noisy positions weighted by 1/p.
    Global averaging: each term is summed over the whole batch and divided by the batch's token count
    (AR: predicted tokens; diffusion: eligible tokens), not averaged per sequence. loss_mask limits both
    terms to answer tokens. alpha = 0 gives exactly the AR cross-entropy.
    """
    batch, length = input_ids.shape
    block = block_size or model.block_size
    eligible = loss_mask.bool() if loss_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    x_t, masked, p = sample_noise(
        input_ids, mask_token_id=model.mask_token_id, block_size=block, eps=eps,
        per_block=per_block, eligible=eligible, generator=generator,
    )
    noisy_logits, clean_logits = dual_stream_forward(model, x_t, input_ids, block)
    noisy_logits, clean_logits = noisy_logits.float(), clean_logits.float()

    ar_targets = eligible[:, 1:]
    ar_ce = F.cross_entropy(clean_logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    n_ar = int(ar_targets.sum())
    ar_loss = (ar_ce * ar_targets.flatten()).sum() / max(n_ar, 1)

    diff_ce = F.cross_entropy(noisy_logits.flatten(0, 1), input_ids.flatten(), reduction="none")
    weights = (masked / p).flatten()
    diff_loss = (diff_ce * weights).sum() / max(int(eligible.sum()), 1)
    return JointLoss(ar_loss + alpha * diff_loss, ar_loss, diff_loss, n_ar, int(masked.sum()))
