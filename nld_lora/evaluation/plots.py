"""The plots a deployer reads: accuracy against tokens/s per mode (the Pareto view) and the latency CDF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nld_lora.report.plots import plt, save_figure

PRIMARY_METRICS = ("pass@1", "answer_exact", "edit_similarity")  # the headline metric, in this order of preference
MARKERS = "osD^vP*Xh<>p"


def distinct_styles(n: int) -> list[tuple[Any, str]]:
    """(colour, marker) for n series, no two alike: tab20's colours up to 20 series, an even hue sweep beyond."""
    cmap = plt.get_cmap("tab20" if n <= 20 else "hsv")
    colours = [cmap(i) for i in range(n)] if n <= 20 else [cmap(i / n) for i in range(n)]
    return [(colour, MARKERS[i % len(MARKERS)]) for i, colour in enumerate(colours)]


def primary_metric(modes: dict[str, Any]) -> str:
    found = {m for mode in modes.values() for m in mode["accuracy"]}
    return next((m for m in PRIMARY_METRICS if m in found), sorted(found)[0])


def plot_accuracy_vs_speed(modes: dict[str, Any], metric: str, path: Path) -> str:
    """One point per mode (each diffusion setting its own): accuracy with its interval against batch-1 tokens/s."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (label, mode), (colour, marker) in zip(modes.items(), distinct_styles(len(modes))):
        a = mode["accuracy"][metric]
        x = mode["tokens_per_s_batch1"]
        ax.errorbar([x], [a["mean"]], yerr=[[a["mean"] - a["ci95"][0]], [a["ci95"][1] - a["mean"]]], fmt=marker,
                    color=colour, capsize=3, label=label)
    ax.set_xlabel("tokens/s at batch 1")
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.set_title("accuracy vs speed per decoding mode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), borderaxespad=0)  # beside: no overlap
    return save_figure(fig, path)


def plot_latency_cdf(e2el_ms: dict[str, list[float]], path: Path) -> str:
    """Share of requests finished within t ms (end-to-end, batch 1), one curve per mode."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (label, values), (colour, _) in zip(e2el_ms.items(), distinct_styles(len(e2el_ms))):
        ordered = sorted(values)
        ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label,
                color=colour)
    ax.set_xlabel("end-to-end latency per request at batch 1 (ms)")
    ax.set_ylabel("share of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), borderaxespad=0)
    return save_figure(fig, path)
