"""The report's speed rows: the fastest lossless self-speculation mode, chosen on other prompts than it is timed on.

Every candidate emits AR's tokens (greedy) or AR's distribution (sampling), so speed is the only thing to choose.
Candidates are timed at batch size 1 on `selection` prompts; the winner is then timed on the report's speed prompts.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from nld_lora.acceptance import expected_tokens
from nld_lora.decoding.auto import between_widths
from nld_lora.decoding.interleave import interleaved
from nld_lora.decoding.stats import GenerationStats

SPEED_CANDIDATES: dict[str, dict[str, Any]] = {
    "self_spec": {"mode": "self_spec"},
    "self_spec ngram": {"mode": "self_spec", "ngram": 3},
    "self_spec auto": {"mode": "self_spec", "draft_len": "auto"},
    "self_spec auto ngram": {"mode": "self_spec", "draft_len": "auto", "ngram": 3},
    "self_spec_quadratic": {"mode": "self_spec_quadratic", "draft_len": None},
    "self_spec_quadratic auto": {"mode": "self_spec_quadratic", "draft_len": "auto"},
}


def fastest_modes(model: Any, adapters: dict[str, str | bool], selection: list[str], timed: list[str],
                  settings: Any, max_new_tokens: int, rounds: int = 3) -> dict[str, dict[str, Any]]:
    """The fastest lossless candidate per run (label -> adapter name, False for none), at batch 1.

    Selection: every candidate of every run on `selection`, interleaved prompt by prompt (decoding/interleave.py),
    so a slow spell of the machine hits them alike. Timing: AR and each run's winner on `timed`, interleaved prompt
    by prompt, in `rounds` rounds; tokens/s is the median over rounds and the speedup the median of each round's
    ratio to that round's AR, so machine drift does not decide a before/after comparison.
    """
    candidates = SPEED_CANDIDATES if settings.temperature <= 0 else {
        name: kw for name, kw in SPEED_CANDIDATES.items() if "ngram" not in kw}  # lookup drafts are greedy-only

    def runner(adapter: str | bool, kw: dict[str, Any]) -> Callable[[list[str]], GenerationStats]:
        return lambda prompts: model.generate(prompts, batch_size=1, max_new_tokens=max_new_tokens,
                                              settings=settings, adapter=adapter, **kw).stats

    picks = interleaved(selection, {(label, name): runner(adapter, kw) for name, kw in candidates.items()
                                    for label, adapter in adapters.items()}, batch_size=1)
    speeds = {label: {name: GenerationStats.concat(picks[(label, name)]).tokens_per_s for name in candidates}
              for label in adapters}
    best = {label: max(s, key=s.get) for label, s in speeds.items()}
    runners = {"ar": runner(False, {"mode": "ar"}),
               **{label: runner(adapter, candidates[best[label]]) for label, adapter in adapters.items()}}
    timings: dict[str, list[float]] = {label: [] for label in runners}
    ratios: dict[str, list[float]] = {label: [] for label in adapters}
    last: dict[str, GenerationStats] = {}
    for rnd in range(rounds):
        round_stats = {label: GenerationStats.concat(parts) for label, parts in
                       interleaved(timed, runners, batch_size=1, start=rnd * len(timed)).items()}
        ar = round_stats["ar"].tokens_per_s
        for label, stats in round_stats.items():
            timings[label].append(stats.tokens_per_s)
            if label in adapters:
                ratios[label].append(stats.tokens_per_s / ar if ar else 0.0)
                last[label] = stats
    return {label: {
        "mode": best[label], "settings": {k: v for k, v in candidates[best[label]].items() if v is not None},
        "tokens_per_s_batch1": statistics.median(timings[label]),
        "speedup_vs_ar_batch1": statistics.median(ratios[label]),
        "ar_tokens_per_s_batch1": statistics.median(timings["ar"]), "rounds": rounds,
        "tpf": last[label].tpf, "acceptance_length": last[label].acceptance_length,
        "draft_len_choices": last[label].draft_len_choices, "lookup_cycles": last[label].lookup_cycles,
        "diffusion_drafts": last[label].forwards["draft"] + last[label].forwards["verify_draft"],
        "selection_tokens_per_s": speeds[label], "selection_prompts": len(selection),
    } for label in adapters}


def forward_ms(model: Any, compiled: bool = False) -> dict[str, float]:
    """Batch-1 forward wall times draft_len="auto" measured in this process, eager (or compiled), width -> ms
    (empty if none)."""
    from nld_lora.adapter.twins import forward_costs

    return {str(width): round(1e3 * t, 3) for (_, comp, rows, width), t in sorted(forward_costs(model).items(),
                                                                                key=lambda kv: kv[0][3])
            if rows == 1 and comp == compiled}


def draft_cycle_cost(position_rates: list[float | None], forward_ms_by_width: dict[str, float]) -> dict[str, Any] | None:
    """What a linear diffusion cycle costs per token at batch 1, priced from a run's measured r_j and the measured
    forward times (linear between measured widths): a cycle of k drafts commits E(k) tokens for a draft and a
    verify forward of width k + 1. Returns the cheapest k, its tokens per cycle and ms per token, next to an AR
    step's ms per token (one width-1 forward): the plain reason a planner does or does not draft here. Forwards
    only, before the runtime's own per-cycle overhead; None without a measured r_1."""
    times = {int(w): t for w, t in forward_ms_by_width.items()}
    widths = sorted(times)
    if not widths or widths[0] != 1:
        raise ValueError(f"forward times must include width 1; got widths {widths}")
    reached = next((i for i, r in enumerate(position_rates) if r is None), len(position_rates))
    known = [float(r) for r in position_rates[:reached]]
    cycles = [(2 * between_widths(times, k + 1), expected_tokens(known, k), k) for k in range(1, min(reached, widths[-1] - 1) + 1)]
    if not cycles:
        return None
    cycle, tokens, k = min(cycles, key=lambda c: c[0] / c[1])
    return {"draft_len": k, "tokens_per_cycle": round(tokens, 3), "ms_per_cycle": round(cycle, 3),
            "ms_per_token": round(cycle / tokens, 3), "ar_ms_per_token": round(times[1], 3)}
