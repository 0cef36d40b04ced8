"""The report's speed rows: the fastest lossless self-speculation mode, chosen on other prompts than it is timed on.

Every candidate emits AR's tokens (greedy) or AR's distribution (sampling), so speed is the only thing to choose.
Candidates are timed at batch size 1 on `selection` prompts; the winner is then timed on the report's speed prompts.
"""

from __future__ import annotations

from typing import Any

SPEED_CANDIDATES: dict[str, dict[str, Any]] = {
    "self_spec": {"mode": "self_spec"},
    "self_spec ngram": {"mode": "self_spec", "ngram": 3},
    "self_spec auto": {"mode": "self_spec", "draft_len": "auto"},
    "self_spec auto ngram": {"mode": "self_spec", "draft_len": "auto", "ngram": 3},
    "self_spec_quadratic": {"mode": "self_spec_quadratic", "draft_len": None},
    "self_spec_quadratic auto": {"mode": "self_spec_quadratic", "draft_len": "auto"},
}


def fastest_mode(model: Any, selection: list[str], timed: list[str], adapter: str | bool, settings: Any,
                 max_new_tokens: int, ar_tokens_per_s: float) -> dict[str, Any]:
    """Time each candidate on `selection` (batch 1), then the fastest on `timed`; returns its name, settings and
    tokens/s, with every candidate's selection speed."""
    candidates = SPEED_CANDIDATES if settings.temperature <= 0 else {
        name: kw for name, kw in SPEED_CANDIDATES.items() if "ngram" not in kw}  # lookup drafts are greedy-only
    speeds = {}
    for name, kw in candidates.items():
        res = model.generate(selection, batch_size=1, max_new_tokens=max_new_tokens, settings=settings,
                             adapter=adapter, **kw)
        speeds[name] = res.stats.tokens_per_s
    best = max(speeds, key=speeds.get)
    res = model.generate(timed, batch_size=1, max_new_tokens=max_new_tokens, settings=settings, adapter=adapter,
                         **candidates[best])
    return {"mode": best, "settings": {k: v for k, v in candidates[best].items() if v is not None},
            "tokens_per_s_batch1": res.stats.tokens_per_s,
            "speedup_vs_ar_batch1": res.stats.tokens_per_s / ar_tokens_per_s if ar_tokens_per_s else 0.0,
            "tpf": res.stats.tpf, "selection_tokens_per_s": speeds, "selection_prompts": len(selection)}
