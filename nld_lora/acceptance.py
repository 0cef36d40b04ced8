"""Acceptance arithmetic, defined once (runtime stats, the adaptive planner and the training objective use it).

A cycle that drafts k tokens and accepts n of them (longest agreeing prefix) "attempts" positions 1..min(n+1, k)
and "accepts" positions 1..n; r_j = accepts_j / attempts_j = P(draft j accepted | drafts 1..j-1 accepted). The
cycle commits n + 1 tokens (the bonus token included), so E(k) = 1 + sum_{j<=k} prod_{i<=j} r_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def count_cycle(attempts: list[int], accepts: list[int], n_accepted: int, drafted: int) -> None:
    """Add one cycle's per-position attempts and accepts to the running counts (lists grow to `drafted`)."""
    if len(attempts) < drafted:
        grow = drafted - len(attempts)
        attempts += [0] * grow
        accepts += [0] * grow
    for j in range(min(n_accepted + 1, drafted)):
        attempts[j] += 1
        if j < n_accepted:
            accepts[j] += 1


def position_counts(accepted: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same counts for many blocks at once: accepted (...,) accepted drafts per block, valid (..., k) rows that
    exist; returns (attempts, accepts) per position, each (k,), summed over blocks."""
    offsets = torch.arange(valid.shape[-1], device=valid.device)
    attempted = (offsets <= accepted[..., None]) & valid
    taken = (offsets < accepted[..., None]) & valid
    return attempted.reshape(-1, valid.shape[-1]).sum(0), taken.reshape(-1, valid.shape[-1]).sum(0)


def rates(accepts: Sequence[int], attempts: Sequence[int]) -> list[float | None]:
    """r_j per position; None where no cycle reached position j (no attempts: no estimate)."""
    return [a / t if t else None for a, t in zip(accepts, attempts)]


def expected_tokens(position_rates: Sequence[float], k: int | None = None) -> float:
    """E(k): tokens a cycle with k drafts commits on average, the bonus token included (k None: every rate)."""
    total, survive = 1.0, 1.0
    for r in position_rates[:k]:
        survive *= float(r)
        total += survive
    return total
