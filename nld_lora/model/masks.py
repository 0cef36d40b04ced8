"""Boolean 4D attention masks (batch, 1, queries, keys); True means "may attend".

Every decoding mode is a mask over [cached slots + new tokens] with explicit position ids, so the same
backbone forward serves prefill, AR, verify, commit (causal) and draft/denoise (bidirectional block).
"""

from __future__ import annotations

import torch


def _with_diagonal(mask: torch.Tensor, past_len: int) -> torch.Tensor:
    """Let every query see its own slot so fully padded rows never yield NaN attention."""
    q = mask.shape[-2]
    idx = torch.arange(q, device=mask.device)
    mask[..., idx, past_len + idx] = True
    return mask


def causal_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Causal mask for q_len new tokens appended after the cached slots.

    key_valid: (batch, past + q_len) bool, False for padding or holes. Query i sits at slot past + i.
    """
    batch, total = key_valid.shape
    past = total - q_len
    q_slot = past + torch.arange(q_len, device=key_valid.device)
    k_slot = torch.arange(total, device=key_valid.device)
    allowed = k_slot[None, :] <= q_slot[:, None]
    mask = (allowed[None] & key_valid[:, None, :]).unsqueeze(1).clone()
    return _with_diagonal(mask, past)


def draft_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Draft/denoise mask: the new block sees every valid cached slot and all of its own positions."""
    batch, total = key_valid.shape
    past = total - q_len
    mask = key_valid[:, None, :].expand(batch, q_len, total).unsqueeze(1).clone()
    return _with_diagonal(mask, past)


def block_pattern(kind: str, q: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which of a forward's q new tokens each new token sees, (q, q) bool: "causal" or "bidirectional"."""
    ones = torch.ones(q, q, dtype=torch.bool, device=device)
    return ones.tril() if kind == "causal" else ones


def quadratic_pattern(verify_rows: int, masks_per_row: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Single-forward self-speculation block [d_0..d_(S-1), S sub-blocks of masks], (q, q) bool.

    Verify row d_i sees d_0..d_i; the masks of sub-block i (slots S + i*M .. S + i*M + M-1) see d_0..d_i and
    their own sub-block.
    """
    s, m = verify_rows, masks_per_row
    q = s * (1 + m)
    pattern = torch.zeros(q, q, dtype=torch.bool, device=device)
    pattern[:s, :s] = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    for i in range(s):
        rows = slice(s + i * m, s + (i + 1) * m)
        pattern[rows, :i + 1] = True
        pattern[rows, rows] = True
    return pattern


def quadratic_offsets(verify_rows: int, masks_per_row: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position of each token of the quadratic block past the row's length: d_i at i, its masks at i+1 .. i+M."""
    verify = torch.arange(verify_rows, device=device)
    masks = verify[:, None] + 1 + torch.arange(masks_per_row, device=device)[None, :]
    return torch.cat([verify, masks.reshape(-1)])


def ragged_mask(lengths: torch.Tensor, window: int, pattern: torch.Tensor) -> torch.Tensor:
    """(batch, 1, q, window) mask for q new tokens written at slots lengths[b] .. lengths[b] + q - 1 of a
    left-aligned cache: every slot below lengths[b] is visible, the new block as `pattern` says, nothing else."""
    q = pattern.shape[0]
    rel = torch.arange(window, device=lengths.device)[None, :] - lengths[:, None]
    inside = (rel >= 0) & (rel < q)
    block = pattern[:, rel.clamp(0, q - 1)].transpose(0, 1)
    return ((rel < 0)[:, None, :] | (inside[:, None, :] & block))[:, None]


def dual_stream_mask(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Training layout [x_t | x_0] of length 2L (shared positions 0..L-1), shape (1, 1, 2L, 2L).

    noisy->noisy: same block, bidirectional; noisy->clean: strictly earlier blocks;
    clean->clean: token-level causal; clean->noisy: nothing.
    """
    pos = torch.arange(seq_len, device=device)
    blk = pos // block_size
    same_block = blk[:, None] == blk[None, :]
    earlier_block = blk[None, :] < blk[:, None]
    causal = pos[None, :] <= pos[:, None]
    none = torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device)
    top = torch.cat([same_block, earlier_block], dim=1)
    bottom = torch.cat([none, causal], dim=1)
    return torch.cat([top, bottom], dim=0)[None, None]


def dual_stream_positions(seq_len: int, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position ids 0..L-1 repeated for the noisy and the clean half."""
    pos = torch.arange(seq_len, device=device)
    return torch.cat([pos, pos])[None].expand(batch, -1)
