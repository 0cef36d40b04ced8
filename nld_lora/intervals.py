"""Percentile-bootstrap intervals over independent units (prompts, eval records), shared by report and eval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float] | None = None, *, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(sum(num) / sum(den), lower, upper): the ratio and its percentile interval, resampling units with
    replacement, so one unit's parts stay together (a prompt's cycles: num = tokens, den = cycles). Without
    denominators each unit counts 1 and the ratio is the mean. An empty sample gives (0, 0, 0)."""
    if n_boot < 1:
        raise ValueError(f"bootstrap: n_boot={n_boot}; expected an integer >= 1")
    num = np.asarray(numerators, dtype=np.float64)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=np.float64)
    if num.size == 0:
        return 0.0, 0.0, 0.0
    point = float(num.sum() / den.sum()) if den.sum() else 0.0
    picks = np.random.default_rng(seed).integers(0, num.size, size=(n_boot, num.size))
    tops, bottoms = num[picks].sum(axis=1), den[picks].sum(axis=1)
    ratios = np.divide(tops, bottoms, out=np.zeros_like(tops), where=bottoms > 0)
    lower, upper = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lower), float(upper)
