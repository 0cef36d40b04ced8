"""Committed tokens per request, with EOS and max_new_tokens handling."""

from __future__ import annotations

import time

from nld_lora.decoding.stats import RequestStats


class Outputs:
    """Per request id: its tokens, stats, token budget and stop ids. Requests 0..n-1 exist from the start with the
    shared max_new_tokens and eos_ids; `add` registers more (the engine's, each with its own)."""

    def __init__(self, n: int, max_new_tokens: int, eos_ids: set[int]):
        self.tokens: dict[int, list[int]] = {}
        self.stats: dict[int, RequestStats] = {}
        self.started: dict[int, float] = {}
        self.budget: dict[int, int] = {}
        self.stop_ids: dict[int, set[int]] = {}
        for rid in range(n):
            self.add(rid, max_new_tokens, eos_ids)

    def add(self, rid: int, max_new_tokens: int, stop_ids: set[int]) -> None:
        self.tokens[rid], self.stats[rid], self.started[rid] = [], RequestStats(), 0.0
        self.budget[rid], self.stop_ids[rid] = max_new_tokens, stop_ids

    def remove(self, rid: int) -> tuple[list[int], RequestStats]:
        """Forget a request (the engine hands its tokens and stats out once)."""
        for table in (self.started, self.budget, self.stop_ids):
            table.pop(rid, None)
        return self.tokens.pop(rid), self.stats.pop(rid)

    def begin(self, rids: list[int]) -> None:
        """These requests' batch starts now (the clock their token times count from)."""
        now = time.perf_counter()
        for rid in rids:
            self.started[rid] = now

    def commit(self, rid: int, new: list[int]) -> bool:
        """Append tokens (cut at a stop id, inclusive, and at the budget); return True when the request is done."""
        out = self.tokens[rid]
        times = self.stats[rid].token_times
        now = time.perf_counter() - self.started[rid]
        stop, budget = self.stop_ids[rid], self.budget[rid]
        for tok in new:
            out.append(tok)
            times.append(now)
            if tok in stop:
                self.finish(rid, "eos")
                return True
            if len(out) >= budget:
                self.finish(rid, "length")
                return True
        return False

    def finish(self, rid: int, reason: str) -> None:
        """Mark a request done: "eos", "length", or from outside the loop ("abort")."""
        self.stats[rid].finish_reason = reason
        self.stats[rid].new_tokens = len(self.tokens[rid])
