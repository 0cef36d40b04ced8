"""Per-request and aggregate decoding statistics; the metric definitions are in docs/design.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nld_lora.acceptance import count_cycle, rates

FORWARD_KINDS = ("prefill", "ar", "draft", "verify", "verify_draft", "denoise", "commit")


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def _pooled(requests: list, name: str) -> list[int]:
    width = max((len(getattr(r, name)) for r in requests), default=0)
    total = [0] * width
    for r in requests:
        for j, v in enumerate(getattr(r, name)):
            total[j] += v
    return total


def safe_ratio(num: float, den: float) -> float:
    """num / den, or 0.0 when den is 0 (no forwards, no attempts, no time)."""
    return num / den if den else 0.0


@dataclass
class RequestStats:
    new_tokens: int = 0
    forwards: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FORWARD_KINDS, 0))
    acceptance_lengths: list[int] = field(default_factory=list)
    position_attempts: list[int] = field(default_factory=list)
    position_accepts: list[int] = field(default_factory=list)
    cycle_starts: list[int] = field(default_factory=list)
    cycle_drafts: list[list[int]] = field(default_factory=list)
    lookup_cycles: int = 0  # cycles whose draft came from prompt lookup (DecodeSettings.ngram)
    draft_len_choices: list[int] = field(default_factory=list)  # per cycle, with draft_len="auto" (0 = an AR step)
    finish_reason: str = ""
    wall_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # per emitted token: seconds since its batch began
    # (the tokens one cycle commits share a time); TTFT, TPOT and inter-token latency come from these

    @property
    def total_forwards(self) -> int:
        return sum(self.forwards.values())

    @property
    def tpf(self) -> float:
        return safe_ratio(self.new_tokens, self.total_forwards)

    @property
    def acceptance_length(self) -> float:
        return _mean(self.acceptance_lengths)

    @property
    def per_position_acceptance(self) -> list[float | None]:
        """r_j per draft position; None where no cycle reached position j (no attempts: no estimate)."""
        return rates(self.position_accepts, self.position_attempts)

    def record_cycle(self, start: int, n_accepted: int, drafts: list[int]) -> None:
        """One draft+verify cycle at seed position `start` that accepted n_accepted of its drafts."""
        count_cycle(self.position_attempts, self.position_accepts, n_accepted, len(drafts))
        self.acceptance_lengths.append(n_accepted + 1)
        self.cycle_starts.append(start)
        self.cycle_drafts.append(drafts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens, "forwards": dict(self.forwards), "total_forwards": self.total_forwards,
            "tpf": self.tpf, "acceptance_lengths": list(self.acceptance_lengths),
            "acceptance_length": self.acceptance_length, "per_position_acceptance": self.per_position_acceptance,
            "finish_reason": self.finish_reason, "wall_s": self.wall_s,
        }


@dataclass
class GenerationStats:
    """Aggregate over requests: sums for counts, pooled cycles for acceptance (not a mean of means)."""

    requests: list[RequestStats]
    wall_s: float
    forward_s: float | None = None  # wall time inside model forwards (generate(profile=True)), else None

    @classmethod
    def concat(cls, parts: list[GenerationStats]) -> GenerationStats:
        """The stats of several generate calls as one: their requests in order, wall and forward times summed
        (forward time only when every part was profiled)."""
        forward = [p.forward_s for p in parts]
        return cls([r for p in parts for r in p.requests], sum(p.wall_s for p in parts),
                   None if any(f is None for f in forward) else sum(forward))

    @property
    def overhead_share(self) -> float | None:
        """Share of wall time spent outside model forwards (the runtime's own cost), when profiled."""
        return None if self.forward_s is None else safe_ratio(self.wall_s - self.forward_s, self.wall_s)

    @property
    def new_tokens(self) -> int:
        return sum(r.new_tokens for r in self.requests)

    @property
    def forwards(self) -> dict[str, int]:
        return {k: sum(r.forwards[k] for r in self.requests) for k in FORWARD_KINDS}

    @property
    def tpf(self) -> float:
        return safe_ratio(self.new_tokens, sum(self.forwards.values()))

    @property
    def acceptance_lengths(self) -> list[int]:
        return [a for r in self.requests for a in r.acceptance_lengths]

    @property
    def acceptance_length(self) -> float:
        return _mean(self.acceptance_lengths)

    @property
    def lookup_cycles(self) -> int:
        return sum(r.lookup_cycles for r in self.requests)

    @property
    def draft_len_choices(self) -> dict[int, int]:
        """How often each draft length was chosen (draft_len="auto"; empty otherwise), 0 = an AR step."""
        counts: dict[int, int] = {}
        for r in self.requests:
            for k in r.draft_len_choices:
                counts[k] = counts.get(k, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def per_position_attempts(self) -> list[int]:
        """Cycles that reached draft position j (pooled over requests)."""
        return _pooled(self.requests, "position_attempts")

    @property
    def per_position_acceptance(self) -> list[float | None]:
        """Pooled r_j; None where no cycle reached position j."""
        return rates(_pooled(self.requests, "position_accepts"), self.per_position_attempts)

    @property
    def tokens_per_s(self) -> float:
        return safe_ratio(self.new_tokens, self.wall_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens, "forwards": self.forwards, "tpf": self.tpf,
            "acceptance_length": self.acceptance_length, "acceptance_lengths": self.acceptance_lengths,
            "per_position_acceptance": self.per_position_acceptance, "wall_s": self.wall_s,
            "forward_s": self.forward_s, "overhead_share": self.overhead_share,
            "tokens_per_s": self.tokens_per_s, "draft_len_choices": self.draft_len_choices, "per_request": [r.as_dict() for r in self.requests],
        }
