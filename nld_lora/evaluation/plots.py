"""The plots a deployer reads: accuracy against tokens/s per mode (the Pareto view) and the latency CDF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nld_lora.report.plots import plt, save_figure

PRIMARY_METRICS = ("pass@1", "answer_exact", "edit_similarity")  # the headline metric, in this order of preference


def primary_metric(modes: dict[str, Any]) -> str:
    found = {m for mode in modes.values() for m in mode["accuracy"]}
    return next((m for m in PRIMARY_METRICS if m in found), sorted(found)[0])


def plot_accuracy_vs_speed(modes: dict[str, Any], metric: str, path: Path) -> str:
    """One point per mode (each diffusion setting its own): accuracy with its interval against batch-1 tokens/s."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, mode in modes.items():
        a = mode["accuracy"][metric]
        x = mode["tokens_per_s_batch1"]
        ax.errorbar([x], [a["mean"]], yerr=[[a["mean"] - a["ci95"][0]], [a["ci95"][1] - a["mean"]]], fmt="o",
                    capsize=3, label=label)
        ax.annotate(label, (x, a["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("tokens/s at batch 1")
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.set_title("accuracy vs speed per decoding mode")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_latency_cdf(e2el_ms: dict[str, list[float]], path: Path) -> str:
    """Share of requests finished within t ms (end-to-end, batch 1), one curve per mode."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in e2el_ms.items():
        ordered = sorted(values)
        ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label)
    ax.set_xlabel("end-to-end latency per request at batch 1 (ms)")
    ax.set_ylabel("share of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
