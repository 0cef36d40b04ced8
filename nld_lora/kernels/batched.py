"""Greedy verify of equal-length drafts in a few whole-batch tensor ops: the non-CUDA path of the runtime, whose
drafts always have one length per cycle (the reference loops over requests, several small ops each)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nld_lora.kernels.validate import check_verify_inputs


def uniform_draft_len(cu_draft_lens: torch.Tensor | Sequence[int]) -> int | None:
    """k when host offsets are 0, k, 2k, ...; None otherwise (device offsets are not read back to find out)."""
    if isinstance(cu_draft_lens, torch.Tensor) or len(cu_draft_lens) < 2:
        return None
    k = int(cu_draft_lens[1])
    return k if all(int(c) == i * k for i, c in enumerate(cu_draft_lens)) else None


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                  cu_draft_lens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """As nld_lora.kernels.reference.verify_greedy, for host offsets of one draft length k per request."""
    cu = check_verify_inputs(target_logits, draft_tokens, cu_draft_lens)
    k = uniform_draft_len(cu)
    if k is None:
        raise ValueError(f"batched verify_greedy needs equal draft lengths; got offsets {cu[:8]}...")
    n = len(cu) - 1
    argmax = target_logits.argmax(dim=-1).to(torch.int32).view(n, k + 1)
    drafts = draft_tokens.to(torch.int32).view(n, k)
    accepted = (argmax[:, :k] == drafts).to(torch.int32).cumprod(1).sum(1, dtype=torch.int32)
    kept = torch.arange(k + 1, device=argmax.device) < accepted[:, None]
    tokens = torch.where(kept, torch.nn.functional.pad(drafts, (0, 1), value=-1), -1)
    bonus = accepted[:, None].long()
    tokens.scatter_(1, bonus, argmax.gather(1, bonus))
    return tokens, accepted
