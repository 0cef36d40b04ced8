"""The decoding runs a comparison holds (report, eval, lm-eval tasks): one plan, label -> generate() arguments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Plan = dict[str, dict[str, Any]]


def diffusion_grid(blocks: Iterable[int], thresholds: Iterable[float]) -> dict[str, dict[str, Any]]:
    """Diffusion mode as a curve: a row per (block size, confidence threshold)."""
    return {f"diffusion b{b} t{t:g}": {"block_size": b, "threshold": t} for b in blocks for t in thresholds}


def mode_plan(*, adapters: dict[str, str] | None = None, diffusion: dict[str, dict[str, Any]] | None = None,
              without_adapter: str = "self_spec") -> Plan:
    """AR, the diffusion rows (label -> settings), self-speculation without an adapter (labelled
    `without_adapter`), then with each adapter (label -> attached adapter name), in that order."""
    plans: Plan = {"ar": {"mode": "ar", "adapter": False}}
    for label, settings in (diffusion or {}).items():
        plans[label] = {"mode": "diffusion", "adapter": False, **settings}
    plans[without_adapter] = {"mode": "self_spec", "adapter": False}
    plans.update({label: {"mode": "self_spec", "adapter": name} for label, name in (adapters or {}).items()})
    return plans
