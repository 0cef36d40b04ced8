"""Report metrics over runtime results: bootstrap intervals, histograms, per-category and lossless checks."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from nld_lora.decoding.stats import GenerationStats, RequestStats, safe_ratio
from nld_lora.intervals import bootstrap_ratio


def pooled_acceptance(requests: list[RequestStats]) -> float:
    """Mean acceptance over all cycles of these requests (the same pooling as GenerationStats)."""
    return GenerationStats(requests, 0.0).acceptance_length


def acceptance_ci(requests: list[RequestStats], n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of pooled acceptance, resampling prompts (cycles of one prompt stay together)."""
    _, lower, upper = bootstrap_ratio([sum(r.acceptance_lengths) for r in requests],
                                      [len(r.acceptance_lengths) for r in requests], n_boot=n_boot, seed=seed,
                                      level=level)
    return lower, upper


def histogram(requests: list[RequestStats], max_len: int) -> list[int]:
    """Counts of cycles committing 1..max_len tokens (index 0 = acceptance length 1)."""
    counts = Counter(a for r in requests for a in r.acceptance_lengths)
    return [counts.get(i, 0) for i in range(1, max_len + 1)]


def summarize_run(stats: GenerationStats, draft_len: int | None, categories: list[str],
                  boot_seed: int = 0) -> dict[str, Any]:
    """Everything a report shows for one run (one mode / adapter)."""
    reqs = stats.requests
    out: dict[str, Any] = {
        "new_tokens": stats.new_tokens, "forwards": stats.forwards, "tpf": stats.tpf,
        "tokens_per_s": stats.tokens_per_s, "wall_s": stats.wall_s,
    }
    if draft_len is not None:
        out.update({
            "acceptance_length": stats.acceptance_length,
            "acceptance_length_ci95": list(acceptance_ci(reqs, seed=boot_seed)),
            "cycles": len(stats.acceptance_lengths),
            "per_position_acceptance": stats.per_position_acceptance,
            "per_position_attempts": stats.per_position_attempts,
            "histogram": histogram(reqs, draft_len + 1),
        })
    groups: dict[str, list[RequestStats]] = defaultdict(list)
    for cat, r in zip(categories, reqs):
        groups[cat or "uncategorized"].append(r)
    out["per_category"] = {
        cat: {"n_prompts": len(rs), "tpf": GenerationStats(rs, 0.0).tpf,
              **({"acceptance_length": pooled_acceptance(rs)} if draft_len is not None else {})}
        for cat, rs in sorted(groups.items())
    }
    return out


def lossless_mismatches(reference: list[list[int]], candidate: list[list[int]]) -> list[int]:
    """Indices of prompts whose emitted tokens differ."""
    return [i for i, (a, b) in enumerate(zip(reference, candidate)) if a != b]


def token_agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict[str, float]:
    """Exact-prompt and token-level agreement (diffusion vs AR: reported, not required)."""
    same = sum(a == b for a, b in zip(reference, candidate))
    matched = total = 0
    for a, b in zip(reference, candidate):
        n = max(len(a), len(b))
        matched += sum(x == y for x, y in zip(a, b))
        total += n
    return {"exact_prompts": same / max(len(reference), 1), "token_agreement": matched / max(total, 1)}


def relative_gain(before: float, after: float) -> float:
    return safe_ratio(after - before, before)
