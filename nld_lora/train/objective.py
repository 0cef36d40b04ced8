"""The drafter objective, mirroring deployed self-speculation.

Teacher (adapter OFF, no grad, causal) over the clean sequence gives the KV cache and AR logits. Student
(adapter ON) runs many draft blocks [x_s, mask x k] in ONE forward over that cache: block b sees the clean
prefix before s_b and, bidirectionally, its own k + 1 slots. Row j of a block is scored against the teacher's
logits at position s + j - 1 (the verify pass's prediction for the same token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from nld_lora.acceptance import expected_tokens, position_counts, rates
from nld_lora.adapter.attach import lora_enabled
from nld_lora.model.masks import causal_mask


@dataclass
class DraftBatch:
    """Padded sequences (prompt + AR target) and draft block starts (s, absolute positions)."""

    input_ids: torch.Tensor  # (B, L), right padded
    lengths: torch.Tensor  # (B,)
    starts: torch.Tensor  # (B, nb), -1 marks an unused block
    draft_len: int
    layout: str = "linear"  # linear: block [x_s, mask x k]; quadratic: [mask x (k+1)] (x_s unseen, as in
    # single-forward self-speculation, where the first mask sits where the bonus token goes)
    first_start: torch.Tensor | None = None  # (B,) each row's first draftable start (its prompt length): where
    # the deployed loop's first cycle starts


@dataclass
class DraftLossOutput:
    loss: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor
    accept_lengths: torch.Tensor  # (n_valid_blocks,) greedy tokens per cycle, bonus included
    position_attempts: torch.Tensor  # (k,)
    position_accepts: torch.Tensor  # (k,)


def block_layout(batch: DraftBatch, mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student input ids [x_s, mask x k] per block ([mask x (k+1)] for the quadratic layout), positions, and the
    (B, 1, Q, L + Q) attention mask."""
    ids, starts, k = batch.input_ids, batch.starts, batch.draft_len
    bsz, length = ids.shape
    nb = starts.shape[1]
    width = k + 1
    safe = starts.clamp(min=0)
    seeds = torch.gather(ids, 1, safe)
    block_ids = torch.full((bsz, nb, width), mask_token_id, dtype=torch.long, device=ids.device)
    if batch.layout == "linear":
        block_ids[:, :, 0] = seeds
    positions = (safe[:, :, None] + torch.arange(width, device=ids.device)).reshape(bsz, nb * width)
    prefix = torch.arange(length, device=ids.device)
    sees_prefix = prefix[None, None, :] < safe[:, :, None]  # (B, nb, L)
    sees_prefix = sees_prefix[:, :, None, :].expand(bsz, nb, width, length).reshape(bsz, nb * width, length)
    block_of = torch.arange(nb * width, device=ids.device) // width
    own_block = (block_of[:, None] == block_of[None, :])[None].expand(bsz, -1, -1)
    mask = torch.cat([sees_prefix, own_block], dim=2)[:, None]
    return block_ids.reshape(bsz, nb * width), positions, mask


@dataclass
class TeacherPass:
    """The causal pass over the clean sequences (every adapter off): its KV cache and AR logits, either at the rows
    of one batch's blocks or over each row's whole draftable span (then any later block set over the same
    sequences, such as the follow-up blocks or a deployed walk, needs no second pass)."""

    cache: DynamicCache
    logits: torch.Tensor  # (B, nb * k, V) block rows, or (B, T, V): positions lo + t
    lo: torch.Tensor | None  # (B,) first position of the span; None: block rows of `starts`
    starts: torch.Tensor

    def blocks(self, batch: DraftBatch) -> torch.Tensor:
        """AR logits (B, nb, k, V) at positions s + j - 1 (j = 1..k) of every block of `batch`."""
        k = batch.draft_len
        bsz, nb = batch.starts.shape
        if self.lo is None:
            if not torch.equal(batch.starts, self.starts):
                raise ValueError("this teacher pass holds one batch's block rows; run it with span=True")
            return self.logits.view(bsz, nb, k, self.logits.shape[-1])
        index = (batch.starts.clamp(min=0)[:, :, None] + torch.arange(k, device=self.lo.device)
                 - self.lo[:, None, None]).clamp(0, self.logits.shape[1] - 1).reshape(bsz, -1)
        rows = torch.gather(self.logits, 1, index[..., None].expand(-1, -1, self.logits.shape[-1]))
        return rows.view(bsz, nb, k, -1)


def teacher_pass(model, batch: DraftBatch, adapter: str | None, *, span: bool = False) -> TeacherPass:
    """Causal pass with every adapter off: the cache and AR logits at the batch's block rows, or (span=True) at
    every position from each row's first draft start (`first_start`, else its lowest start) to its end."""
    ids, k = batch.input_ids, batch.draft_len
    bsz, length = ids.shape
    valid = torch.arange(length, device=ids.device)[None] < batch.lengths[:, None]
    if span:
        lo = batch.first_start if batch.first_start is not None else torch.where(
            batch.starts >= 0, batch.starts, length).min(1).values
        lo = lo.clamp(max=length - 1)
        width = int((batch.lengths - lo).max().clamp(min=1))
        index = (lo[:, None] + torch.arange(width, device=ids.device)).clamp(max=length - 1)
    else:
        lo = None
        index = (batch.starts.clamp(min=0)[:, :, None] + torch.arange(k, device=ids.device)).reshape(bsz, -1)
        index = index.clamp(max=length - 1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), lora_enabled(model, adapter, on=False):
        logits, _ = model(ids, attention_mask=causal_mask(valid, length),
                          position_ids=torch.arange(length, device=ids.device)[None].expand(bsz, -1),
                          cache=cache, logits_index=index)
    return TeacherPass(cache, logits, lo, batch.starts)


def student_logits(model, batch: DraftBatch, cache: DynamicCache, mask_token_id: int) -> torch.Tensor:
    """Draft logits (B, nb, k, V) for rows 1..k of every block, in one forward over the teacher's cache."""
    block_ids, positions, mask = block_layout(batch, mask_token_id)
    bsz, q = block_ids.shape
    k = batch.draft_len
    nb = q // (k + 1)
    rows = (torch.arange(nb, device=block_ids.device)[:, None] * (k + 1) + 1 + torch.arange(k, device=block_ids.device))
    logits, _ = model(block_ids, attention_mask=mask, position_ids=positions, cache=cache,
                      logits_index=rows.reshape(1, -1).expand(bsz, -1))
    cache.crop(-q)
    return logits.view(bsz, nb, k, -1)


def row_validity(batch: DraftBatch) -> torch.Tensor:
    """(B, nb, k): row j of a block counts when its target token x_{s+j} lies inside the sequence."""
    k = batch.draft_len
    target_pos = batch.starts[:, :, None] + 1 + torch.arange(k, device=batch.starts.device)
    return (batch.starts[:, :, None] >= 0) & (target_pos < batch.lengths[:, None, None])


def follow_up_batch(batch: DraftBatch, accepted: torch.Tensor) -> DraftBatch:
    """The blocks the deployed loop drafts next: after a block at s accepts n drafts, the next cycle's seed is the
    bonus token at s + n + 1 (a context right after a rejected draft, where deployed cycles start). Starts that
    leave no target token to draft are -1."""
    nxt = batch.starts + accepted.to(batch.starts.dtype) + 1
    keep = (batch.starts >= 0) & (nxt <= batch.lengths[:, None] - 2)
    return DraftBatch(batch.input_ids, batch.lengths, torch.where(keep, nxt, -1), batch.draft_len, batch.layout,
                      batch.first_start)


@torch.no_grad()
def deployed_walk(model, batch: DraftBatch, teacher: TeacherPass, mask_token_id: int,
                  keep_going: Callable[[bool], bool] = bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The cycles greedy self-speculation runs over each row's target (the loop commits exactly the collected AR
    tokens, so its cycle starts depend only on the drafts): the first cycle starts at `first_start`, a cycle at s
    that accepts n drafts is followed by one at s + n + 1. Call with the adapter under test on; `teacher` must
    hold the span. keep_going maps "a row here still has a cycle to run" to whether to run another forward (under
    several processes: whether any rank has one). Returns starts (B, C) (-1 pads) and each cycle's committed
    tokens n + 1 (0 pads)."""
    if batch.first_start is None:
        raise ValueError("deployed_walk needs batch.first_start (make_batch sets it)")
    first = batch.first_start[:, None]
    hop = DraftBatch(batch.input_ids, batch.lengths, torch.where(first <= batch.lengths[:, None] - 2, first, -1),
                     batch.draft_len, batch.layout, batch.first_start)
    starts, commits = [], []
    while keep_going(bool((hop.starts >= 0).any())):
        student = student_logits(model, hop, teacher.cache, mask_token_id)
        accepted = greedy_acceptance(student, teacher.blocks(hop), row_validity(hop))
        starts.append(hop.starts[:, 0])
        commits.append(torch.where(hop.starts[:, 0] >= 0, accepted[:, 0] + 1, 0))
        hop = follow_up_batch(hop, accepted)  # the loop's own next-cycle rule
    if not starts:
        empty = torch.empty(batch.starts.shape[0], 0, dtype=torch.long, device=batch.starts.device)
        return empty, empty
    return torch.stack(starts, 1), torch.stack(commits, 1).to(torch.long)


def sample_starts(starts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Up to n distinct valid starts per row of `starts` (B, C), drawn at random; -1 pads rows with fewer."""
    keys = torch.rand(starts.shape, generator=generator).to(starts.device).masked_fill(starts < 0, -1.0)
    take = min(n, starts.shape[1])
    top, idx = keys.topk(take, dim=1)
    picked = torch.where(top >= 0, starts.gather(1, idx), -1)
    if take < n:
        picked = torch.cat([picked, picked.new_full((starts.shape[0], n - take), -1)], 1)
    return picked


def greedy_acceptance(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Leading agreement count per block (B, nb) of argmaxes; rows beyond the sequence stop the walk."""
    agree = (student.argmax(-1) == teacher.argmax(-1)) & valid
    return agree.to(torch.int32).cumprod(-1).sum(-1)


def lk_hybrid(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 3.0,
              top: int = 200) -> torch.Tensor:
    """NLD's LK-hybrid per row: lambda * KL(p~||q~) + (1 - lambda) * TV, on the union of both top-`top` sets.

    lambda = exp(-0.5 * sg[overlap]), overlap = sum min(p~, q~); p~, q~ renormalised over the union at T.
    """
    top = min(top, student.shape[-1])
    idx = torch.cat([teacher.topk(top, -1).indices, student.topk(top, -1).indices], -1)
    idx, _ = idx.sort(-1)
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
    t = teacher.gather(-1, idx).float().masked_fill(dup, float("-inf")) / temperature
    s = student.gather(-1, idx).float().masked_fill(dup, float("-inf")) / temperature
    log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    kl = (p * (log_p - log_q)).masked_fill(dup, 0.0).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    overlap = torch.minimum(p, q).sum(-1).detach()
    lam = torch.exp(-0.5 * overlap)
    return lam * kl + (1 - lam) * tv


def draft_loss(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, *, ce_weight: float = 1.0,
    distill_weight: float = 1.0, distill: str = "lk_hybrid", distill_temperature: float = 3.0, top: int = 200,
    position_weighting: str = "accepted_plus_one", first_position_weight: float = 1.0,
) -> DraftLossOutput:
    """CE to the teacher's argmax + distillation, on valid rows (only "accepted + 1" rows by default); row 1 weighs
    first_position_weight times the others (every cycle pays for it: raising it keeps the adapter from trading r_1
    for later positions)."""
    k = student.shape[-2]
    accepted = greedy_acceptance(student.detach(), teacher, valid)
    offsets = torch.arange(k, device=student.device)
    attempted = (offsets <= accepted[..., None]) & valid  # rows the deployed loop reaches: accepted + 1
    if position_weighting == "accepted_plus_one":
        weights = attempted
    elif position_weighting == "uniform":
        weights = valid
    else:
        raise ValueError(f"position_weighting={position_weighting!r}; expected 'accepted_plus_one' or 'uniform'")
    weights = weights.float()
    weights[..., 0] *= first_position_weight
    w = weights.flatten()
    s_flat, t_flat = student.flatten(0, -2), teacher.flatten(0, -2).float()
    ce = F.cross_entropy(s_flat.float(), t_flat.argmax(-1), reduction="none")
    if distill == "lk_hybrid":
        dist = lk_hybrid(s_flat, t_flat, distill_temperature, top)
    elif distill == "kl":
        dist = F.kl_div((s_flat.float() / distill_temperature).log_softmax(-1),
                        (t_flat / distill_temperature).log_softmax(-1), log_target=True, reduction="none").sum(-1)
    elif distill == "tv":
        p = (t_flat / distill_temperature).softmax(-1)
        dist = 0.5 * (p - (s_flat.float() / distill_temperature).softmax(-1)).abs().sum(-1)
    elif distill == "none":
        dist = torch.zeros_like(ce)
    else:
        raise ValueError(f"distill={distill!r}; expected 'lk_hybrid', 'kl', 'tv' or 'none'")
    denom = w.sum().clamp(min=1.0)
    ce_mean = (ce * w).sum() / denom
    dist_mean = (dist * w).sum() / denom
    block_ok = valid[..., 0]
    attempts, accepts = position_counts(accepted[block_ok], valid[block_ok])
    return DraftLossOutput(ce_weight * ce_mean + distill_weight * dist_mean, ce_mean.detach(), dist_mean.detach(),
                           (accepted[block_ok] + 1).detach(), attempts.detach(), accepts.detach())


def simulated_acceptance(attempts: torch.Tensor, accepts: torch.Tensor) -> float:
    """Expected tokens per cycle from per-position agreement, E(k) over every drafted position (bonus included);
    a position no block reached counts as rate 0."""
    return expected_tokens([r or 0.0 for r in rates(accepts.tolist(), attempts.tolist())])
