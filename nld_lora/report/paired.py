"""r_1 with and without the adapter at the same draft contexts.

The per-position r_1 of two runs compares cycles that start at different contexts: a run that accepts more crosses
the easy stretches inside its cycles, so its cycles start at harder places, and its pooled r_1 can fall while its
drafts are better at every context. Here both drafters are scored at the same contexts (the cycle starts of one
run): that run's own first drafts are its recorded ones, and the other drafter drafts again through the same
runtime, generate() on the context as the prompt, whose first cycle drafts exactly there (tested to reproduce a
run's recorded first drafts).
"""

from __future__ import annotations

import math
import random
from typing import Any

from nld_lora.decoding.settings import DecodeSettings

Context = tuple[list[int], int, int, bool]  # (tokens in the cache at a cycle's start, its seed, what draft 1 must
# match, whether the run's own first draft there did)


def cycle_contexts(result: Any) -> list[Context]:
    """Every cycle of a greedy self-speculation result as a context: cycle_starts count the tokens in the cache,
    the next token is the cycle's seed and the one after it the target of its first draft (cycles whose target
    lies past the decoded tokens are left out)."""
    found = []
    for prompt, seq, req in zip(result.prompt_ids, result.sequences, result.stats.requests):
        full = prompt + seq
        found += [(full[:s], full[s], full[s + 1], bool(d) and d[0] == full[s + 1])
                  for s, d in zip(req.cycle_starts, req.cycle_drafts) if s + 1 < len(full)]
    return found


def first_cycle_drafts(model: Any, contexts: list[list[int]], seeds: list[int], adapter: str | bool,
                       settings: DecodeSettings, batch_size: int) -> list[list[int]]:
    """The drafts of the first cycle after each context, drafted through the runtime: generate() on the context as
    the prompt (max 2 new tokens: the prefill's seed, then a draft + verify cycle). A context whose prefill does not
    reproduce its seed is an error: the drafts would then not follow the same context."""
    res = model.generate(contexts, mode="self_spec", adapter=adapter, max_new_tokens=2, settings=settings,
                         batch_size=batch_size)
    for i, (seed, seq, req) in enumerate(zip(seeds, res.sequences, res.stats.requests)):
        if seq[0] != seed or not req.cycle_drafts:
            raise RuntimeError(f"context {i} (cache length {len(contexts[i])}) decoded seed {seq[0]} where the run "
                               f"had {seed}, or ran no cycle; the contexts are not reproducible")
    return [req.cycle_drafts[0] for req in res.stats.requests]


def first_draft_hits(model: Any, contexts: list[Context], adapter: str | bool, settings: DecodeSettings,
                     batch_size: int) -> list[bool]:
    """Whether the first draft at each context equals its target: one cycle per context (first_cycle_drafts)."""
    drafts = first_cycle_drafts(model, [c[0] for c in contexts], [c[1] for c in contexts], adapter, settings,
                                batch_size)
    return [d[0] == c[2] for d, c in zip(drafts, contexts)]


def paired_change(without: list[bool], with_: list[bool]) -> dict[str, Any]:
    """r_1 of both drafters on the same contexts, the discordant counts and a 95% normal interval of the paired
    difference (with - without)."""
    n = len(without)
    only_with = sum(w and not o for o, w in zip(without, with_))
    only_without = sum(o and not w for o, w in zip(without, with_))
    diff = (only_with - only_without) / n
    half = 1.96 * math.sqrt(max((only_with + only_without) / n - diff * diff, 0.0) / n)
    return {"n": n, "before": sum(without) / n, "after": sum(with_) / n, "after_only": only_with,
            "before_only": only_without, "change_ci95": [diff - half, diff + half]}


def first_position_paired(model: Any, before: Any, after: Any, adapter: str, settings: DecodeSettings,
                          n: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """{"before": ..., "after": ...} paired_change at a seeded sample of at most n cycle starts of the run without
    the adapter (before) and of the run with it (after). Each run's own first drafts there are its recorded ones;
    only the other drafter drafts again."""
    rng = random.Random(seed)
    out = {}
    for label, result, other in (("before", before, adapter), ("after", after, False)):
        contexts = cycle_contexts(result)
        sample = rng.sample(contexts, min(n, len(contexts)))
        if not sample:
            continue
        own = [c[3] for c in sample]
        redrafted = first_draft_hits(model, sample, other, settings, batch_size)
        out[label] = paired_change(own, redrafted) if label == "before" else paired_change(redrafted, own)
    return out
