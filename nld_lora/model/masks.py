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
