"""PNG plots for the report (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path) -> str:
    """Write the figure as a PNG, close it, return the file name (what report.md links)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # legends placed beside the axes stay in the picture
    plt.close(fig)
    return path.name


def plot_histograms(runs: dict[str, dict], path: Path) -> str:
    """Acceptance-length histograms (share of cycles), one bar group per run."""
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(runs)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        hist = runs[name]["histogram"]
        total = max(sum(hist), 1)
        xs = [x + 1 + (i - (len(names) - 1) / 2) * width for x in range(len(hist))]
        ax.bar(xs, [h / total for h in hist], width=width, label=f"{name} (mean {runs[name]['acceptance_length']:.2f})")
    ax.set_xlabel("tokens committed per cycle (acceptance length, bonus included)")
    ax.set_ylabel("share of cycles")
    ax.set_title("Acceptance-length histogram")
    ax.legend()
    return save_figure(fig, path)


def plot_per_position(runs: dict[str, dict], path: Path) -> str:
    """Conditional acceptance rate r_j per draft position."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, run in runs.items():
        rates = run["per_position_acceptance"]
        reached = [(j + 1, r) for j, r in enumerate(rates) if r is not None]  # unreached positions: no point
        ax.plot([j for j, _ in reached], [r for _, r in reached], marker="o", ms=3, label=name)
    ax.set_xlabel("draft position j (positions no cycle reached are left out)")
    ax.set_ylabel("P(draft j accepted | 1..j-1 accepted)")
    ax.set_ylim(0, 1)
    ax.set_title("Per-position acceptance")
    ax.legend()
    return save_figure(fig, path)


def plot_categories(runs: dict[str, dict], path: Path) -> str:
    """Mean acceptance length per prompt category and run."""
    cats = sorted({c for run in runs.values() for c in run["per_category"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(cats)), 4))
    width = 0.8 / max(len(runs), 1)
    for i, (name, run) in enumerate(runs.items()):
        vals = [run["per_category"].get(c, {}).get("acceptance_length", 0.0) for c in cats]
        ax.bar([x + (i - (len(runs) - 1) / 2) * width for x in range(len(cats))], vals, width=width, label=name)
    ax.set_xticks(range(len(cats)), cats, rotation=20)
    ax.set_ylabel("mean acceptance length")
    ax.set_title("Acceptance by category")
    ax.legend()
    return save_figure(fig, path)
