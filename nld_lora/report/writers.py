"""report.md: headline first, then per category, then per position; plots linked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONVENTIONS = (
    "Acceptance length = tokens committed per draft+verify cycle, bonus token included (1 .. draft_len + 1). "
    "TPF = new tokens / all model forwards of the request, prefill included (AR = 1.00; linear self-speculation "
    "~ acceptance / 2). r_j = P(draft token j accepted | drafts 1..j-1 accepted). Lossless: greedy "
    "self-speculation must emit exactly AR's tokens."
)


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _fastest_rows(report: dict[str, Any]) -> list[str]:
    """Headline rows for the fastest lossless mode (report/speed.py), when the report measured it."""
    b, a = report["before"].get("fastest"), report["after"].get("fastest")
    if not (b and a):
        return []
    where = "the timed prompts (too few prompts to hold some out)" if a["selected_on_timed_prompts"] else \
        f"{a['selection_prompts']} other prompts"
    return [f"| fastest lossless mode, batch 1 (chosen on {where}) | {b['mode']} | {a['mode']} | |",
            f"| its tokens/s, batch 1 (median of {a.get('rounds', 1)} interleaved rounds) | "
            f"{b['tokens_per_s_batch1']:.1f} ({b['speedup_vs_ar_batch1']:.2f}x AR) | "
            f"{a['tokens_per_s_batch1']:.1f} ({a['speedup_vs_ar_batch1']:.2f}x AR) | |"]


def _paragraph(text: str) -> list[str]:
    return [text, ""] if text else []


def _first_position_row(report: dict[str, Any]) -> list[str]:
    """r_1, the acceptance rate of the first draft position: every cycle pays for it, so an adapter must not lower
    it."""
    b, a = (report[k].get("per_position_acceptance") or [None] for k in ("before", "after"))
    if b[0] is None or a[0] is None:
        return []
    change = _pct(a[0] / b[0] - 1) if b[0] > 0 else ""
    return [f"| r_1 (first draft position accepted) | {b[0]:.3f} | {a[0]:.3f} | {change} |"]


def _paired_rows(report: dict[str, Any]) -> list[str]:
    """r_1 of both drafters at the same contexts (report/paired.py): the row above compares cycles that start at
    different places."""
    where = {"before": "cycle starts of the run without the adapter", "after": "cycle starts of the run with it"}
    rows = []
    for label, p in report.get("first_position_paired", {}).items():
        lo, hi = p["change_ci95"]
        rows.append(f"| r_1 at the same contexts: {p['n']} {where[label]} | {p['before']:.3f} | {p['after']:.3f} | "
                    f"{100 * (p['after'] - p['before']):+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    return rows


def fastest_verdict(report: dict[str, Any]) -> str:
    """One sentence on whether the adapter's fastest mode beat the fastest mode without it, and if not, the
    measured reason: that neither run drafted with diffusion (the adapter took no part), else tokens per forward
    against what a forward of each width costs here."""
    b, a = report["before"].get("fastest"), report["after"].get("fastest")
    if not (b and a):
        return ""
    if a["speedup_vs_ar_batch1"] >= b["speedup_vs_ar_batch1"]:
        return (f"With the adapter the fastest lossless mode is faster: {a['speedup_vs_ar_batch1']:.2f}x AR against "
                f"{b['speedup_vs_ar_batch1']:.2f}x without it (batch 1, interleaved rounds)."
                + ("" if a["diffusion_drafts"] else " Its run chose no diffusion draft (AR steps and lookup cycles "
                   "only), so the difference is not the adapter's drafts: it is between two timings of the same "
                   "kind of work."))
    slower = (f"With the adapter the fastest lossless mode is slower ({a['speedup_vs_ar_batch1']:.2f}x AR against "
              f"{b['speedup_vs_ar_batch1']:.2f}x without it, batch 1, interleaved rounds). Measured reason: ")
    counts = (f"TPF {a['tpf']:.3f} against {b['tpf']:.3f}, acceptance {a['acceptance_length']:.2f} against "
              f"{b['acceptance_length']:.2f}, lookup cycles {a['lookup_cycles']} against {b['lookup_cycles']}, "
              f"diffusion draft forwards {a['diffusion_drafts']} against {b['diffusion_drafts']}")
    if not (a["diffusion_drafts"] or b["diffusion_drafts"]):
        return (slower + f"neither run chose a diffusion draft, only AR steps and lookup cycles ({counts}), so the "
                "adapter's drafts took no part: the gap is between two timings of the same kind of work.")
    costs = report.get("forward_ms_batch1") or {}
    cost_text = ", ".join(f"width {w}: {ms:.2f} ms" for w, ms in costs.items()) or "not measured"
    return (slower + f"{counts}, while a diffusion draft costs a second forward; forwards here cost {cost_text}. A "
            "cycle pays only when its tokens exceed the cost of its forwards in AR steps.")


def draft_cycle_sentence(report: dict[str, Any]) -> str:
    """The batch-1 price of a diffusion draft cycle against an AR step, from measured r_j and forward times
    (report/speed.py draft_cycle_cost): why a planner drafts here or takes lookup cycles and AR steps instead."""
    cost = report.get("draft_cycle_batch1") or {}
    if not (cost.get("before") and cost.get("after")):
        return ""
    b, a = cost["before"], cost["after"]

    def cycle(c: dict[str, Any]) -> str:
        return (f"{c['ms_per_token']:.2f} ms per token ({c['draft_len']} drafts: {c['tokens_per_cycle']:.2f} tokens "
                f"per cycle for two width-{c['draft_len'] + 1} forwards, {c['ms_per_cycle']:.2f} ms)")
    return (f"Priced by its forwards alone (batch 1, the measured r_j and forward times), a diffusion draft cycle at "
            f"its cheapest draft length costs {cycle(a)} with the adapter and {cycle(b)} without, against "
            f"{a['ar_ms_per_token']:.2f} ms for an AR step: drafting pays only below that, and the runtime's own "
            "per-cycle work comes on top.")


def _fit_lines(report: dict[str, Any]) -> list[str]:
    """Fit vs transfer: the adapter's gain on prompts it was trained on next to its gain on held-out ones."""
    if "fit" not in report:
        return []
    f, b, a = report["fit"], report["before"], report["after"]
    return ["## Fit vs transfer", "",
            "| prompts | n | before | after | gain |", "|---|---:|---:|---:|---:|",
            f"| training prompts (fit) | {f['n_prompts']} | {f['before']:.3f} | {f['after']:.3f} | {_pct(f['gain'])} |",
            f"| held-out prompts (transfer) | {report['n_prompts']} | {b['acceptance_length']:.3f} | "
            f"{a['acceptance_length']:.3f} | {_pct(report['gain']['acceptance_length_rel'])} |",
            "", "A fit gain far above the held-out gain means the adapter learned its training prompts more than "
            "the domain.", ""]


def _position_cell(run: dict[str, Any], j: int) -> str:
    rates, attempts = run["per_position_acceptance"], run.get("per_position_attempts", [])
    rate = rates[j] if j < len(rates) else None
    n = attempts[j] if j < len(attempts) else 0
    return f"- ({n})" if rate is None else f"{rate:.3f} ({n})"


def _format_line(report: dict[str, Any]) -> str:
    """Prompt format (chat template, system prompt) and, from the recipe, how thinking text was collected."""
    fmt = report.get("prompt_format", {})
    template = (f"chat template applied (sha256 {fmt.get('chat_template_sha256')})"
                if fmt.get("chat_template_applied") else "prompts used as plain text (no chat template)")
    system = f"system prompt {fmt['system_prompt']!r}" if fmt.get("system_prompt") else "no system prompt"
    parts = [f"Prompt format: {template}, {system}"]
    collect = report.get("recipe", {}).get("collect")
    if collect:
        thinking = ("thinking kept in targets" if collect.get("thinking", "keep") == "keep" else
                    f"thinking capped at {collect.get('max_thinking_tokens')} tokens "
                    f"(then {collect.get('end_think_token')} forced)")
        parts.append(f"training targets: {thinking}")
    return "; ".join(parts) + "."


EVAL_HEADING = "## Accuracy, latency and cost per mode (`eval/`)"


def write_markdown(report: dict[str, Any], path: Path, evaluation: dict[str, Any] | None = None) -> None:
    """report.md from report.json's dict; with `evaluation` (an eval.json's dict, from the folder `eval/` beside
    the report's) its tables follow, so one file shows acceptance and accuracy."""
    s = report["settings"]
    runs = report["runs"]
    spec = [lab for lab in runs if lab not in ("ar", "diffusion")]
    lines = [
        "# Self-speculation acceptance report",
        "",
        f"Model `{report['model']['path']}` (weights {report['model']['weights_hash']}), "
        f"{report['n_prompts']} prompts from `{report['prompts']}`; block {s['block_size']}, draft length "
        f"{s['draft_len']}, max {s['max_new_tokens']} new tokens, temperature {s['temperature']}, batch "
        f"{s['batch_size']}. Machine: {report['machine']['platform']} ({report['machine']['device']}).",
        "",
        _format_line(report),
        "",
        "## Headline",
        "",
        "| | before (no adapter) | after | change |",
        "|---|---:|---:|---:|",
        f"| mean acceptance length | {report['before']['acceptance_length']:.3f} "
        f"[{report['before']['acceptance_length_ci95'][0]:.2f}, {report['before']['acceptance_length_ci95'][1]:.2f}]"
        f" | {report['after']['acceptance_length']:.3f} [{report['after']['acceptance_length_ci95'][0]:.2f}, "
        f"{report['after']['acceptance_length_ci95'][1]:.2f}] | {_pct(report['gain']['acceptance_length_rel'])} |",
        f"| TPF | {report['before']['tpf']:.3f} | {report['after']['tpf']:.3f} | {_pct(report['gain']['tpf_rel'])} |",
        *_first_position_row(report),
        *_paired_rows(report),
        f"| speedup vs AR (batch {s['batch_size']}) | {report['before']['speedup_vs_ar']:.2f}x | "
        f"{report['after']['speedup_vs_ar']:.2f}x | |",
        f"| speedup vs AR (batch 1) | {report['before']['speedup_vs_ar_batch1']:.2f}x | "
        f"{report['after']['speedup_vs_ar_batch1']:.2f}x | |",
        *_fastest_rows(report),
        "",
        *_paragraph(fastest_verdict(report)),
        *_paragraph(draft_cycle_sentence(report)),
        f"Lossless check (greedy self-spec vs AR): **{report['lossless']['mismatches']} mismatching prompts**"
        if report["lossless"]["checked"] else "Lossless check: not applicable (sampling).",
        "",
        "Brackets: 95% bootstrap interval over prompts"
        + ("; for r_1 at the same contexts, a 95% interval of the paired change. The plain r_1 row pools each run's "
           "own cycles, which start at different contexts (a run that accepts more starts its cycles at harder "
           "places); the same-context rows draft with and without the adapter at identical contexts."
           if report.get("first_position_paired") else "."),
        "",
        *_fit_lines(report),
        "## All runs",
        "",
        "| run | acceptance | TPF | tokens/s (batch) | tokens/s (batch 1) | speedup vs AR |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for lab, run in runs.items():
        acc = f"{run['acceptance_length']:.3f}" if "acceptance_length" in run else "-"
        lines.append(f"| {lab} | {acc} | {run['tpf']:.3f} | {run['tokens_per_s']:.1f} | "
                     f"{run['tokens_per_s_batch1']:.1f} | {run['speedup_vs_ar']:.2f}x |")
    if "diffusion_agreement" in report["lossless"]:
        agree = report["lossless"]["diffusion_agreement"]
        lines += ["", f"Diffusion vs AR (reported, not required): {100 * agree['exact_prompts']:.1f}% prompts "
                      f"identical, {100 * agree['token_agreement']:.1f}% tokens agree."]
    lines += ["", "## Per category (mean acceptance length)", "",
              "| category | prompts | " + " | ".join(spec) + " |", "|---|---:|" + "---:|" * len(spec)]
    for cat in report["categories"]:
        n = runs["before"]["per_category"].get(cat, {}).get("n_prompts", 0)
        vals = [f"{runs[lab]['per_category'].get(cat, {}).get('acceptance_length', 0.0):.3f}" for lab in spec]
        lines.append(f"| {cat} | {n} | " + " | ".join(vals) + " |")
    width = max(len(runs[lab]["per_position_acceptance"]) for lab in spec)
    lines += ["", "## Per position (r_j)", "",
              "r_j with the number of cycles that reached position j in brackets; `-` = no cycle reached it "
              "(no estimate, not a rate of 0).", "",
              "| j | " + " | ".join(spec) + " |", "|---:|" + "---:|" * len(spec)]
    for j in range(width):
        lines.append(f"| {j + 1} | " + " | ".join(_position_cell(runs[lab], j) for lab in spec) + " |")
    p = report["plots"]
    lines += ["", "## Plots", "", f"![acceptance histogram]({p['histogram']})", "",
              f"![per-position acceptance]({p['per_position']})", "", f"![per-category]({p['categories']})", "",
              "## Conventions", "", CONVENTIONS, ""]
    if evaluation is not None:
        from nld_lora.evaluation.runner import eval_tables

        lines += [EVAL_HEADING, "", *eval_tables(evaluation, plots_at="../eval/")]
    path.write_text("\n".join(lines))
