"""draft_len="auto": pick each cycle's draft length from measured acceptance and measured forward costs.

A cycle with k drafts emits E(k) = 1 + sum_j prod_{i<=j} r_i tokens on average (r_i: the rate at which draft
position i is accepted given that position i-1 was), and costs the forwards of its mode: a draft and a verify of
width k+1 (linear) or one forward of width (k+1)(k+2) (single-forward). k = 0 is a plain AR step (one forward of
width 1, one token). The planner takes the k with the most tokens per second. Rates start from a prior (the
adapter's evaluated per-position rates when it has them, else PRIOR_RATE) worth PRIOR_WEIGHT cycles and are
updated with every verified cycle of the call. Forward times are measured once per (batch rows, width) and process;
the runtime's own per-cycle cost (verification, bookkeeping) is learnt from the wall time of the cycles run, as a
running ratio of measured to predicted time, kept apart for AR steps and speculative cycles.
"""

from __future__ import annotations

import time

import torch

PRIOR_RATE = 0.6
PRIOR_WEIGHT = 4.0
TIMING_REPEATS = 3
COST_SMOOTHING = 0.2  # weight of the newest cycle in the measured/predicted time ratio


def expected_tokens(rates: list[float], k: int) -> float:
    """Tokens per cycle with k drafts: the bonus token plus the expected accepted prefix."""
    total, survive = 1.0, 1.0
    for r in rates[:k]:
        survive *= r
        total += survive
    return total


def forward_seconds(batch, width: int) -> float:
    """Median wall time of a verify-shaped forward of `width` tokens on this batch (not counted, not kept: the next
    forward overwrites its cache slots); cached on the model per (device, rows, width)."""
    costs = batch.model.__dict__.setdefault("_forward_cost_s", {})
    key = (str(batch.model.device), len(batch), width)
    if key not in costs:
        tokens = torch.full((len(batch), width), batch.model.mask_token_id, device=batch.model.device)
        times = []
        batch.forward(tokens, "verify", counted=[False] * len(batch), logits_index=slice(0, 1))  # warm-up
        for _ in range(TIMING_REPEATS):
            _sync(batch.model.device)
            t0 = time.perf_counter()
            batch.forward(tokens, "verify", counted=[False] * len(batch), logits_index=slice(0, 1))
            _sync(batch.model.device)
            times.append(time.perf_counter() - t0)
        costs[key] = sorted(times)[len(times) // 2]
    return costs[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class DraftPlanner:
    """Chooses the draft length of the next cycle (0..max_len) for one decode batch."""

    def __init__(self, max_len: int, quadratic: bool, prior: list[float] | None = None):
        self.max_len = max_len
        self.quadratic = quadratic
        prior = [min(max(float(r), 0.05), 0.95) for r in (prior or [])]
        self.prior = (prior + [prior[-1] if prior else PRIOR_RATE] * max_len)[:max_len]
        self.attempts = [0] * max_len
        self.accepts = [0] * max_len
        self.time_ratio = {False: 1.0, True: 1.0}  # measured / predicted cycle time: AR steps, speculative cycles
        self._started = self._predicted = 0.0
        self._costs: dict[int, list[float]] = {}  # batch rows -> predicted seconds per cycle for k = 0..max_len

    def rates(self) -> list[float]:
        return [(a + PRIOR_WEIGHT * p) / (t + PRIOR_WEIGHT) for a, t, p in zip(self.accepts, self.attempts,
                                                                                 self.prior)]

    def cycle_seconds(self, batch, k: int) -> float:
        if k == 0:
            return forward_seconds(batch, 1)
        if self.quadratic:
            return forward_seconds(batch, (k + 1) * (k + 2))
        return 2 * forward_seconds(batch, k + 1)

    def choose(self, batch) -> int:
        """The draft length with the most expected tokens per second (0: an AR step); starts the cycle's clock."""
        if len(batch) not in self._costs:
            self._costs[len(batch)] = [self.cycle_seconds(batch, k) for k in range(self.max_len + 1)]
        costs = self._costs[len(batch)]
        best, best_rate, tokens, survive = 0, 1.0 / (costs[0] * self.time_ratio[False]), 1.0, 1.0
        spec_ratio = self.time_ratio[True]
        for k, r in enumerate(self.rates(), start=1):
            survive *= r
            tokens += survive
            if tokens / (costs[k] * spec_ratio) > best_rate:
                best, best_rate = k, tokens / (costs[k] * spec_ratio)
        self._predicted = costs[best]
        self._started = time.perf_counter()
        return best

    def finish(self, k: int) -> None:
        """Stop the cycle's clock (after its tokens reached the host) and learn the runtime's overhead from it."""
        ratio = (time.perf_counter() - self._started) / self._predicted
        self.time_ratio[k > 0] += COST_SMOOTHING * (ratio - self.time_ratio[k > 0])

    def record(self, accepted: list[int], drafted: int) -> None:
        """Update the rates with one cycle's verified rows (accepted drafts per row out of `drafted`)."""
        for n in accepted:
            for j in range(min(n + 1, drafted)):
                self.attempts[j] += 1
                self.accepts[j] += j < n
