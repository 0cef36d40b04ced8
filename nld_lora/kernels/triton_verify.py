"""Fused Triton verify kernels (greedy and rejection-sampled), semantics identical to kernels/reference.py.

Kernel 1 (one program per logits row): split-vocabulary pass computing max/argmax (first index on ties,
masked lanes -inf), and for sampling the online logsumexp of x/T plus the scaled logit of the row's token.
Kernel 2 (one program per request): walks its drafts to the first mismatch/rejection and writes the accepted
tokens and the bonus/correction token; on a sampled rejection it races over the vocabulary for max(0, p - q).
Set TRITON_INTERPRET=1 before import to run on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from nld_lora.kernels import rng
from nld_lora.kernels.validate import check_verify_inputs, device_offsets

# compiled kernels may read module globals only when they are tl.constexpr (the interpreter does not check this)
MASK32 = tl.constexpr(rng.MASK32)
C_POS = tl.constexpr(rng.C_POS)
C_LANE = tl.constexpr(rng.C_LANE)
C_STREAM = tl.constexpr(rng.C_STREAM)
M1 = tl.constexpr(rng.M1)
M2 = tl.constexpr(rng.M2)
STREAM_ACCEPT = tl.constexpr(rng.STREAM_ACCEPT)
STREAM_RACE = tl.constexpr(rng.STREAM_RACE)

BLOCK_V = 1024
MAX_SPLITS = 32


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * M2) & MASK32
    return x ^ (x >> 16)


@triton.jit
def _uniform(seed, pos, lane, stream: tl.constexpr):
    x = _mix32(seed & MASK32)
    x = _mix32(x ^ ((pos * C_POS) & MASK32))
    x = _mix32(x ^ (((lane + stream * C_STREAM) * C_LANE) & MASK32))
    return ((x >> 8) + 1).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _row_stats_kernel(
    logits_ptr, stride_row, vocab, chunks_per_split, n_splits, inv_temp_ptr, token_ptr,
    part_max_ptr, part_idx_ptr, part_lmax_ptr, part_lsum_ptr, tok_logit_ptr,
    WITH_LSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (row, split): max/first argmax and (optionally) max/sum-exp of x/T over one vocabulary slice."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    lo = split * chunks_per_split * BLOCK
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = lo.to(tl.int32)
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.full((), 0.0, tl.float32)
    inv_t = 1.0
    if WITH_LSE:
        inv_t = tl.load(inv_temp_ptr + row)
    for c in range(0, chunks_per_split):
        idx = lo + c * BLOCK + offs
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        first = tl.min(tl.where(x == m, idx, vocab + BLOCK), axis=0)
        take = m > best
        best_idx = tl.where(take, first, best_idx)
        best = tl.where(take, m, best)
        if WITH_LSE:
            xs = x * inv_t
            ms = tl.max(xs, axis=0)
            new_max = tl.maximum(run_max, ms)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(xs - safe), axis=0)
            run_max = new_max
    out = row * n_splits + split
    tl.store(part_max_ptr + out, best)
    tl.store(part_idx_ptr + out, best_idx)
    if WITH_LSE:
        tl.store(part_lmax_ptr + out, run_max)
        tl.store(part_lsum_ptr + out, run_sum)
        if split == 0:
            tok = tl.load(token_ptr + row)
            has_tok = tok >= 0
            val = tl.load(base + tl.where(has_tok, tok, 0)).to(tl.float32) * inv_t
            tl.store(tok_logit_ptr + row, tl.where(has_tok, val, 0.0))


@triton.jit
def _accept_kernel(
    cu_ptr, draft_tok_ptr, t_argmax_ptr, t_lse_ptr, t_tok_ptr, d_lse_ptr, d_tok_ptr,
    temp_ptr, seed_ptr, t_logits_ptr, t_stride, d_logits_ptr, d_stride, vocab,
    tokens_ptr, num_acc_ptr, width,
    SAMPLED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
):
    req = tl.program_id(0)
    start = tl.load(cu_ptr + req)
    k = tl.load(cu_ptr + req + 1) - start
    row0 = start + req
    j = tl.arange(0, BLOCK_K)
    in_k = j < k
    drafts = tl.load(draft_tok_ptr + start + j, mask=in_k, other=0).to(tl.int32)
    greedy = True
    temp = 0.0
    seed = tl.full((), 0, tl.int64)
    if SAMPLED:
        temp = tl.load(temp_ptr + req)
        greedy = temp <= 0.0
        seed = tl.load(seed_ptr + req).to(tl.int64)
    if greedy:
        am = tl.load(t_argmax_ptr + row0 + j, mask=in_k, other=0)
        ok = am == drafts
    else:
        logp = tl.load(t_tok_ptr + row0 + j, mask=in_k, other=0.0) - tl.load(t_lse_ptr + row0 + j, mask=in_k,
                                                                             other=0.0)
        logq = tl.load(d_tok_ptr + start + j, mask=in_k, other=0.0) - tl.load(d_lse_ptr + start + j, mask=in_k,
                                                                             other=0.0)
        u = _uniform(seed, j.to(tl.int64), tl.zeros_like(j).to(tl.int64), STREAM_ACCEPT)
        ok = tl.log(u) <= logp - logq
    n_acc = tl.min(tl.where(in_k & (ok == 0), j, k), axis=0)
    bonus = tl.load(t_argmax_ptr + row0 + n_acc)
    if SAMPLED:
        if not greedy:
            inv_t = 1.0 / temp
            t_row = t_logits_ptr + (row0 + n_acc).to(tl.int64) * t_stride
            t_lse = tl.load(t_lse_ptr + row0 + n_acc)
            has_q = n_acc < k
            q_limit = tl.where(has_q, vocab, 0)
            d_row = d_logits_ptr + (start + tl.where(has_q, n_acc, 0)).to(tl.int64) * d_stride
            d_lse = tl.load(d_lse_ptr + start + n_acc)  # d_lse has one spare slot, so this is in bounds
            offs = tl.arange(0, BLOCK)
            best = tl.full((), float("-inf"), tl.float32)
            best_idx = tl.full((), 0, tl.int32)
            for v0 in range(0, vocab, BLOCK):
                idx = v0 + offs
                lane_ok = idx < vocab
                lp = tl.load(t_row + idx, mask=lane_ok, other=float("-inf")).to(tl.float32) * inv_t - t_lse
                lq = tl.load(d_row + idx, mask=idx < q_limit, other=float("-inf")).to(tl.float32) * inv_t - d_lse
                resid = tl.exp(lp) - tl.exp(lq)
                log_r = tl.where(has_q, tl.log(tl.maximum(resid, 0.0)), lp)
                uv = _uniform(seed, n_acc.to(tl.int64), idx.to(tl.int64), STREAM_RACE)
                score = tl.where(lane_ok, log_r - tl.log(-tl.log(uv)), float("-inf"))
                m = tl.max(score, axis=0)
                first = tl.min(tl.where(score == m, idx, vocab + BLOCK), axis=0)
                take = m > best
                best_idx = tl.where(take, first, best_idx)
                best = tl.where(take, m, best)
            bonus = best_idx
    out = tl.where(j < n_acc, drafts, tl.where(j == n_acc, bonus, -1))
    tl.store(tokens_ptr + req * width + j, out, mask=j < width)
    tl.store(num_acc_ptr + req, n_acc)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_stats(logits: torch.Tensor, inv_temp: torch.Tensor | None, row_tokens: torch.Tensor | None):
    """argmax, logsumexp(x/T) and x[token]/T per row; lse gets one spare slot for in-bounds scalar loads.

    The vocabulary is split over up to MAX_SPLITS programs per row (a GPU stays busy with few rows); the
    per-split partials are combined here: the first split holding the maximum keeps torch.argmax's tie rule.
    """
    rows, vocab = logits.shape
    dev = logits.device
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    chunks = triton.cdiv(vocab, block)
    n_splits = min(MAX_SPLITS, chunks)
    per_split = triton.cdiv(chunks, n_splits)
    part_max = torch.empty((rows, n_splits), dtype=torch.float32, device=dev)
    part_idx = torch.empty((rows, n_splits), dtype=torch.int32, device=dev)
    with_lse = inv_temp is not None
    part_lmax = torch.empty((rows, n_splits), dtype=torch.float32, device=dev) if with_lse else part_max
    part_lsum = torch.empty((rows, n_splits), dtype=torch.float32, device=dev) if with_lse else part_max
    tok = torch.zeros(rows, dtype=torch.float32, device=dev)
    lse = torch.zeros(rows + 1, dtype=torch.float32, device=dev)
    if rows == 0:
        return torch.empty(0, dtype=torch.int32, device=dev), lse, tok
    _row_stats_kernel[(rows, n_splits)](
        logits, logits.stride(0), vocab, per_split, n_splits,
        inv_temp if with_lse else part_max, row_tokens if with_lse else part_idx,
        part_max, part_idx, part_lmax, part_lsum, tok, WITH_LSE=with_lse, BLOCK=block,
    )
    top = part_max.max(dim=1, keepdim=True).values
    first_split = (part_max == top).to(torch.int8).argmax(dim=1, keepdim=True)
    argmax = part_idx.gather(1, first_split).squeeze(1).contiguous()
    if with_lse:
        m = part_lmax.max(dim=1, keepdim=True).values
        safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
        total = (part_lsum * torch.exp(part_lmax - safe)).sum(dim=1)
        lse[:rows] = m.squeeze(1) + torch.log(total)
    return argmax, lse, tok


def _outputs(cu_host: list[int], dev: torch.device):
    """Request count, output width (longest draft + 1) and the output buffers, sized from the host offsets."""
    n = len(cu_host) - 1
    width = max((b - a for a, b in zip(cu_host, cu_host[1:])), default=0) + 1
    return n, width, torch.empty((n, width), dtype=torch.int32, device=dev), torch.empty(n, dtype=torch.int32,
                                                                                          device=dev)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                  cu_draft_lens: torch.Tensor | Sequence[int]):
    """Triton twin of reference.verify_greedy."""
    cu_host = check_verify_inputs(target_logits, draft_tokens, cu_draft_lens)
    target_logits = _rows_contiguous(target_logits)
    cu = device_offsets(cu_draft_lens, cu_host, target_logits.device)
    drafts = draft_tokens.to(torch.int32).contiguous()
    argmax, _, _ = _row_stats(target_logits, None, None)
    n, width, tokens, n_acc = _outputs(cu_host, target_logits.device)
    if n:
        _accept_kernel[(n,)](
            cu, drafts, argmax, argmax, argmax, argmax, argmax, argmax, argmax, target_logits, 0,
            target_logits, 0, target_logits.shape[1], tokens, n_acc, width,
            SAMPLED=False, BLOCK_K=triton.next_power_of_2(width), BLOCK=16,
        )
    return tokens, n_acc


def verify_sampled(
    target_logits: torch.Tensor, draft_logits: torch.Tensor, draft_tokens: torch.Tensor,
    cu_draft_lens: torch.Tensor | Sequence[int], temperature: torch.Tensor, seeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of reference.verify_sampled."""
    cu_host = check_verify_inputs(target_logits, draft_tokens, cu_draft_lens, draft_logits, temperature, seeds)
    target_logits = _rows_contiguous(target_logits)
    draft_logits = _rows_contiguous(draft_logits)
    dev = target_logits.device
    cu = device_offsets(cu_draft_lens, cu_host, dev)
    counts = (cu[1:] - cu[:-1]).long()
    temp = temperature.to(torch.float32).contiguous()
    inv = torch.where(temp > 0, 1.0 / temp.clamp(min=1e-30), torch.ones_like(temp))
    drafts = draft_tokens.to(torch.int32).contiguous()
    # target row of draft d is d + (its request index): the row before it; bonus rows keep -1
    req = torch.arange(len(counts), device=dev)
    # output_size from the host offsets: repeat_interleave would otherwise sync to size its result
    d_req = torch.repeat_interleave(req, counts, output_size=cu_host[-1])
    t_tokens = torch.full((target_logits.shape[0],), -1, dtype=torch.int32, device=dev)
    t_tokens[torch.arange(drafts.numel(), device=dev) + d_req] = drafts
    t_req = torch.repeat_interleave(req, counts + 1, output_size=target_logits.shape[0])
    t_argmax, t_lse, t_tok = _row_stats(target_logits, inv[t_req].contiguous(), t_tokens)
    _, d_lse, d_tok = _row_stats(draft_logits, inv[d_req].contiguous(), drafts)
    n, width, tokens, n_acc = _outputs(cu_host, dev)
    if n:
        _accept_kernel[(n,)](
            cu, drafts, t_argmax, t_lse, t_tok, d_lse, d_tok, temp, seeds.to(torch.int64).contiguous(),
            target_logits, target_logits.stride(0), draft_logits, draft_logits.stride(0), target_logits.shape[1],
            tokens, n_acc, width,
            SAMPLED=True, BLOCK_K=triton.next_power_of_2(width),
            BLOCK=min(BLOCK_V, triton.next_power_of_2(target_logits.shape[1])),
        )
    return tokens, n_acc
