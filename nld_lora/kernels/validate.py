"""Input checks shared by the Triton kernels and their references (clear errors, before any launch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_verify_inputs(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_draft_lens: torch.Tensor | Sequence[int],
    draft_logits: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
) -> list[int]:
    """Raise ValueError naming the bad input; return cu_draft_lens as a host list.

    A tensor of offsets: everything the checks need from the device (the offsets and the draft range) comes over
    in one copy, and the callers reuse the list instead of reading the offsets again. Offsets given as a host
    sequence (the runtime knows its draft lengths): no device-to-host copy at all, and the draft ids are taken to
    lie in [0, vocab) (the runtime's drafts are argmax ids or context tokens), so a verify step's only sync is the
    caller's read of the results.
    """
    if target_logits.dim() != 2:
        raise ValueError(f"target_logits must be 2D (rows, vocab); got shape {tuple(target_logits.shape)}")
    if target_logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"target_logits dtype {target_logits.dtype} not in {FLOAT_DTYPES}")
    given = {"draft_tokens": draft_tokens, "cu_draft_lens": cu_draft_lens, "draft_logits": draft_logits,
             "temperature": temperature, "seeds": seeds}
    for name, t in given.items():
        if isinstance(t, torch.Tensor) and t.device != target_logits.device:
            raise ValueError(f"{name} is on {t.device} but target_logits is on {target_logits.device}; "
                             "put every verify input on one device")
    if not isinstance(cu_draft_lens, torch.Tensor):
        cu, lo, hi = [int(c) for c in cu_draft_lens], 0, 0
        if not cu:
            raise ValueError("cu_draft_lens must be cumulative draft counts starting at 0 (length num_requests + 1)")
    else:
        if cu_draft_lens.dim() != 1 or cu_draft_lens.numel() < 1:
            raise ValueError("cu_draft_lens must be 1D cumulative draft counts starting at 0 (length num_requests "
                             "+ 1)")
        flat = draft_tokens.reshape(-1).long()
        bounds = torch.stack(torch.aminmax(flat)) if flat.numel() else flat
        host = torch.cat([cu_draft_lens.long(), bounds]).tolist()
        cu, (lo, hi) = host[: cu_draft_lens.numel()], (host[cu_draft_lens.numel():] or [0, 0])
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_draft_lens must start at 0 and be non-decreasing; got {cu[:8]}...")
    n = len(cu) - 1
    rows, vocab = target_logits.shape
    if rows != cu[-1] + n:
        raise ValueError(f"target_logits has {rows} rows; expected sum(draft_len_i + 1) = {cu[-1] + n}")
    if draft_tokens.dim() != 1 or draft_tokens.numel() != cu[-1]:
        raise ValueError(f"draft_tokens must be 1D with {cu[-1]} entries; got shape {tuple(draft_tokens.shape)}")
    if lo < 0 or hi >= vocab:
        raise ValueError(f"draft_tokens must lie in [0, {vocab}); got range [{lo}, {hi}]")
    if draft_logits is not None:
        if tuple(draft_logits.shape) != (cu[-1], vocab):
            raise ValueError(f"draft_logits must have shape ({cu[-1]}, {vocab}); got {tuple(draft_logits.shape)}")
    for name, t in (("temperature", temperature), ("seeds", seeds)):
        if t is not None and (t.dim() != 1 or t.numel() != n):
            raise ValueError(f"{name} must be 1D with one entry per request ({n}); got shape {tuple(t.shape)}")
    return cu


def device_offsets(cu_draft_lens: torch.Tensor | Sequence[int], cu_host: list[int],
                   device: torch.device) -> torch.Tensor:
    """The offsets as an int32 tensor on the logits' device. From a host list without a blocking copy (which would
    wait for the queued kernels, the sync the list is there to avoid): equal draft lengths, the runtime's case, are
    an arange made on the device; ragged ones go over from pinned memory, asynchronously."""
    if isinstance(cu_draft_lens, torch.Tensor):
        return cu_draft_lens.to(torch.int32)
    steps = {b - a for a, b in zip(cu_host, cu_host[1:])}
    if len(steps) <= 1:
        step = steps.pop() if steps else 0
        return torch.arange(len(cu_host), dtype=torch.int32, device=device) * step
    host = torch.tensor(cu_host, dtype=torch.int32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
