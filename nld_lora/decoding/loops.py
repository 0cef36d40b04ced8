"""The three decoding loops over a DecodeBatch: AR, block diffusion, linear self-speculation."""

from __future__ import annotations

import torch

from nld_lora.decoding.batch import DecodeBatch
from nld_lora.decoding.lookup import ngram_draft
from nld_lora.decoding.outputs import Outputs
from nld_lora.decoding.sampling import filter_logits, select_tokens, select_with_confidence
from nld_lora.decoding.settings import DecodeSettings
from nld_lora.kernels import verify_greedy, verify_sampled
from nld_lora.kernels.rng import mix32


def _commit_rows(batch: DecodeBatch, out: Outputs, new_tokens: list[list[int]], seeds: torch.Tensor) -> torch.Tensor:
    """Commit per-row tokens, drop finished rows; returns the seeds of the rows still live."""
    live = [i for i, rid in enumerate(batch.rows) if not out.commit(rid, new_tokens[i])]
    if len(live) != len(batch):
        batch.select(live)
        seeds = seeds[live]
    return seeds


def _prefill(batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator) -> torch.Tensor:
    seeds = select_tokens(batch.prefill()[:, -1], cfg.temperature, gen, cfg.top_k, cfg.top_p)
    return _commit_rows(batch, out, [[t] for t in seeds.tolist()], seeds)


def run_ar(batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator) -> None:
    seeds = _prefill(batch, out, cfg, gen)
    while len(batch):
        logits = batch.forward(seeds[:, None], "ar")
        batch.keep_written(1, torch.ones(len(batch), dtype=torch.long, device=seeds.device))
        seeds = select_tokens(logits[:, -1], cfg.temperature, gen, cfg.top_k, cfg.top_p)
        seeds = _commit_rows(batch, out, [[t] for t in seeds.tolist()], seeds)


def _pick_positions(conf: torch.Tensor, masked: torch.Tensor, cfg: DecodeSettings, last_step: bool) -> torch.Tensor:
    """Which masked positions to commit this step: the forced one (policy) plus all above the threshold."""
    if last_step:
        return masked.clone()
    choose = masked & (conf >= cfg.threshold)
    has_mask = masked.any(1)
    if cfg.policy == "leftmost":
        forced = masked.to(torch.int8).argmax(1)
    else:
        forced = conf.masked_fill(~masked, float("-inf")).argmax(1)
    rows = torch.arange(len(masked), device=masked.device)
    choose[rows[has_mask], forced[has_mask]] = True
    return choose


def run_diffusion(batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator,
                  commit_log: list | None = None) -> None:
    """Blocks [seed, mask x (B-1)] denoised with confidence commits; a causal commit pass per block."""
    seeds = _prefill(batch, out, cfg, gen)
    mask_id = batch.model.mask_token_id
    width = cfg.block_size
    max_steps = cfg.max_steps or max(width - 1, 1)
    while len(batch):
        block = torch.full((len(batch), width), mask_id, dtype=torch.long, device=seeds.device)
        block[:, 0] = seeds
        masked = torch.ones_like(block, dtype=torch.bool)
        masked[:, 0] = False
        commits = torch.zeros_like(block, dtype=torch.int32)
        step = 0
        while any(pending := masked.any(1).tolist()):
            step += 1
            logits = batch.forward(block, "denoise", counted=pending)
            pred, conf = select_with_confidence(logits, cfg.temperature, gen, cfg.top_k, cfg.top_p)
            choose = _pick_positions(conf, masked, cfg, last_step=step >= max_steps)
            block = torch.where(choose, pred, block)
            commits += choose.to(torch.int32)
            masked &= ~choose
        if commit_log is not None:
            commit_log.append(commits.clone())
        logits = batch.forward(block, "commit", logits_index=slice(width - 1, width))
        batch.keep_written(width, torch.full((len(batch),), width, dtype=torch.long, device=seeds.device))
        seeds = select_tokens(logits[:, -1], cfg.temperature, gen, cfg.top_k, cfg.top_p)
        seeds = _commit_rows(batch, out, torch.cat([block[:, 1:], seeds[:, None]], 1).tolist(), seeds)


def _cycle_seeds(cfg: DecodeSettings, rows: list[int], cycle: int, device) -> torch.Tensor:
    base = torch.tensor([cfg.seed * 7919 + cycle] * len(rows), dtype=torch.int64, device=device)
    return mix32((base ^ torch.tensor(rows, dtype=torch.int64, device=device) * 0x27D4EB2F) & 0xFFFFFFFF)


def _exact_match(target: torch.Tensor, drafts: torch.Tensor, cfg: DecodeSettings, gen: torch.Generator):
    """NLD's rule: sample the AR token at every row and accept drafts equal to it (lossless, accepts less)."""
    ar = select_tokens(target, cfg.temperature, gen, cfg.top_k, cfg.top_p)
    k = drafts.shape[1]
    n = (ar[:, :k] == drafts).to(torch.int32).cumprod(1).sum(1)
    tokens = torch.full_like(ar, -1, dtype=torch.int32)
    tokens[:, :k] = torch.where(torch.arange(k, device=ar.device) < n[:, None], drafts, -1)
    rows = torch.arange(len(ar), device=ar.device)
    tokens[rows, n] = ar[rows, n].to(torch.int32)
    return tokens, n


def _lookup_drafts(batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, k: int) -> list[list[int]] | None:
    """Per row, a prompt-lookup draft from prompt + committed tokens (greedy only: verification then stays exact
    without draft probabilities); None when lookup is off."""
    if cfg.ngram <= 0 or cfg.temperature > 0:
        return None
    return [ngram_draft(batch.prompts[rid] + out.tokens[rid], cfg.ngram, k) for rid in batch.rows]


def _merge_drafts(lookups: list[list[int]], drafts: torch.Tensor | None, k: int, filler: int,
                  device) -> torch.Tensor:
    """Rows with a lookup take it (its tail past the match from the diffusion draft, or a filler token that
    verification rejects); the others keep their diffusion draft."""
    merged = drafts.clone() if drafts is not None else torch.full((len(lookups), k), filler, dtype=torch.long,
                                                                   device=device)
    for i, found in enumerate(lookups):
        if found:
            merged[i, :len(found)] = torch.tensor(found, dtype=torch.long, device=device)
    return merged


def run_self_spec(batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator) -> None:
    """Draft [seed, mask x k] bidirectionally (adapter on), verify causally (adapter off), keep prefix + bonus."""
    seeds = _prefill(batch, out, cfg, gen)
    mask_id = batch.model.mask_token_id
    k = cfg.draft_len
    cycle = 0
    while len(batch):
        n_rows = len(batch)
        lookups = _lookup_drafts(batch, out, cfg, k)
        if lookups is not None and all(lookups):
            drafts = _merge_drafts(lookups, None, k, mask_id, seeds.device)  # every row matched: no draft forward
        else:
            block = torch.full((n_rows, k + 1), mask_id, dtype=torch.long, device=seeds.device)
            block[:, 0] = seeds
            draft_logits = batch.forward(block, "draft", logits_index=slice(1, None))
            drafts = select_tokens(draft_logits, cfg.temperature, gen, cfg.top_k, cfg.top_p)
            if lookups is not None:
                drafts = _merge_drafts(lookups, drafts, k, mask_id, seeds.device)
        starts = batch.next_pos.tolist()
        verify_in = torch.cat([seeds[:, None], drafts], 1)
        target = batch.forward(verify_in, "verify")
        cu = torch.arange(n_rows + 1, device=seeds.device, dtype=torch.int32) * k
        if cfg.temperature <= 0:
            tokens, n_acc = verify_greedy(target.reshape(-1, target.shape[-1]), drafts.reshape(-1), cu)
        elif cfg.acceptance == "exact_match":
            tokens, n_acc = _exact_match(target, drafts, cfg, gen)
        else:
            temps = torch.full((n_rows,), cfg.temperature, device=seeds.device)
            tokens, n_acc = verify_sampled(
                filter_logits(target, cfg.top_k, cfg.top_p).reshape(-1, target.shape[-1]),
                filter_logits(draft_logits, cfg.top_k, cfg.top_p).reshape(-1, target.shape[-1]),
                drafts.reshape(-1), cu, temps, _cycle_seeds(cfg, batch.rows, cycle, seeds.device),
            )
        n_acc = n_acc.long()
        batch.keep_written(k + 1, n_acc + 1)
        accepted, drafted, emitted = n_acc.tolist(), drafts.tolist(), tokens.tolist()
        new = []
        for i, rid in enumerate(batch.rows):
            out.stats[rid].record_cycle(starts[i], accepted[i], drafted[i])
            out.stats[rid].lookup_cycles += bool(lookups and lookups[i])
            new.append(emitted[i][: accepted[i] + 1])
        seeds = tokens[torch.arange(n_rows, device=tokens.device), n_acc].long()
        seeds = _commit_rows(batch, out, new, seeds)
        cycle += 1
