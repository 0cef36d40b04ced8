"""Committed tokens per request, with EOS and max_new_tokens handling."""

from __future__ import annotations

import time

from nld_lora.decoding.stats import RequestStats


class Outputs:
    def __init__(self, n: int, max_new_tokens: int, eos_ids: set[int]):
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.stats = [RequestStats() for _ in range(n)]
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.started = [0.0] * n

    def begin(self, rids: list[int]) -> None:
        """These requests' batch starts now (the clock their token times count from)."""
        now = time.perf_counter()
        for rid in rids:
            self.started[rid] = now

    def commit(self, rid: int, new: list[int]) -> bool:
        """Append tokens (cut at EOS, inclusive, and at max_new_tokens); return True when the request is done."""
        out = self.tokens[rid]
        times = self.stats[rid].token_times
        now = time.perf_counter() - self.started[rid]
        for tok in new:
            out.append(tok)
            times.append(now)
            if tok in self.eos_ids:
                self._finish(rid, "eos")
                return True
            if len(out) >= self.max_new_tokens:
                self._finish(rid, "length")
                return True
        return False

    def _finish(self, rid: int, reason: str) -> None:
        self.stats[rid].finish_reason = reason
        self.stats[rid].new_tokens = len(self.tokens[rid])
