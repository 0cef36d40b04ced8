"""PyTorch reference twins of the fused verify kernels: identical signatures and semantics.

Layout (ragged batch of N requests): request i has k_i = cu_draft_lens[i+1] - cu_draft_lens[i] draft tokens,
stored at draft_tokens[cu[i]:cu[i+1]]; its k_i + 1 verifier rows start at target row cu[i] + i (the row after
the seed predicts draft 1, ..., the last row predicts the bonus token). Outputs: tokens (N, max_k + 1) int32,
the accepted drafts then the bonus/correction token, padded with -1; num_accepted (N,) int32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nld_lora.kernels.rng import STREAM_ACCEPT, STREAM_RACE, uniform
from nld_lora.kernels.validate import check_verify_inputs


def _counts(cu: list[int]) -> list[int]:
    return [b - a for a, b in zip(cu, cu[1:])]


def verify_greedy(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, cu_draft_lens: torch.Tensor | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the longest prefix with draft_j == argmax(row j-1); emit it plus argmax of the next row."""
    cu = check_verify_inputs(target_logits, draft_tokens, cu_draft_lens)
    counts = _counts(cu)
    n = len(counts)
    width = max(counts, default=0) + 1
    tokens = torch.full((n, width), -1, dtype=torch.int32, device=target_logits.device)
    accepted = torch.zeros(n, dtype=torch.int32, device=target_logits.device)
    argmax = target_logits.argmax(dim=-1).to(torch.int32)
    for i, k in enumerate(counts):
        rows = argmax[cu[i] + i: cu[i] + i + k + 1]
        drafts = draft_tokens[cu[i]: cu[i] + k].to(torch.int32)
        match = (rows[:k] == drafts).to(torch.int32)
        a = int(match.cumprod(0).sum()) if k else 0
        tokens[i, :a] = drafts[:a]
        tokens[i, a] = rows[a]
        accepted[i] = a
    return tokens, accepted


def _residual_race(p_logits: torch.Tensor, q_logits: torch.Tensor | None, temp: float, seed: torch.Tensor,
                   pos: int) -> int:
    """Sample from normalised max(0, p - q) (or p when q is None) by an exponential race."""
    v = p_logits.shape[-1]
    logp = torch.log_softmax(p_logits.float() / temp, dim=-1)
    if q_logits is None:
        log_r = logp
    else:
        logq = torch.log_softmax(q_logits.float() / temp, dim=-1)
        log_r = torch.log(torch.clamp(torch.exp(logp) - torch.exp(logq), min=0.0))
    lanes = torch.arange(v, device=p_logits.device, dtype=torch.int64)
    u = uniform(seed, torch.tensor(pos, dtype=torch.int64), lanes, STREAM_RACE)
    score = log_r - torch.log(-torch.log(u))
    return int(score.argmax())


def verify_sampled(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_draft_lens: torch.Tensor | Sequence[int],
    temperature: torch.Tensor,
    seeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling: accept d_j with prob min(1, p/q), else sample max(0, p - q).

    p = softmax(target/T), q = softmax(draft/T); requests with T <= 0 follow the greedy rule. Random numbers
    are keyed on (seeds[i], position j, lane) so the Triton kernel replays them exactly.
    """
    cu = check_verify_inputs(target_logits, draft_tokens, cu_draft_lens, draft_logits, temperature, seeds)
    counts = _counts(cu)
    n = len(counts)
    width = max(counts, default=0) + 1
    tokens = torch.full((n, width), -1, dtype=torch.int32, device=target_logits.device)
    accepted = torch.zeros(n, dtype=torch.int32, device=target_logits.device)
    temps = temperature.float().tolist()
    for i, k in enumerate(counts):
        t_rows = target_logits[cu[i] + i: cu[i] + i + k + 1]
        d_rows = draft_logits[cu[i]: cu[i] + k]
        drafts = draft_tokens[cu[i]: cu[i] + k]
        temp = temps[i]
        if temp <= 0:
            tok, acc = verify_greedy(t_rows, drafts, [0, k])
            tokens[i, : k + 1] = tok[0]
            accepted[i] = acc[0]
            continue
        seed = seeds[i].to(torch.int64)
        a = 0
        while a < k:
            d = int(drafts[a])
            logp = torch.log_softmax(t_rows[a].float() / temp, -1)[d]
            logq = torch.log_softmax(d_rows[a].float() / temp, -1)[d]
            u = uniform(seed, torch.tensor(a, dtype=torch.int64), torch.tensor(0, dtype=torch.int64), STREAM_ACCEPT)
            if torch.log(u) > logp - logq:
                break
            a += 1
        tokens[i, :a] = drafts[:a].to(torch.int32)
        q_row = d_rows[a] if a < k else None
        tokens[i, a] = _residual_race(t_rows[a], q_row, temp, seed, a)
        accepted[i] = a
    return tokens, accepted
