"""`nld-lora eval`: every decoding mode on the same eval prompts: accuracy (with 95% bootstrap intervals and the
delta to AR), per-request latency at batch 1, throughput and cost; eval.json + eval.md.

Modes: AR, block diffusion, self-speculation without and (with an adapter) with it. Greedy self-speculation must
score exactly what AR scores; the report says whether its tokens are identical (a difference is a bug).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nld_lora.config_io import bounded, check_ranges, writable_dir
from nld_lora.data.readers import read_text
from nld_lora.decoding.settings import DecodeSettings
from nld_lora.evaluation.execution import check_test_code, run_execution
from nld_lora.evaluation.latency import cost_per_million_tokens, request_latency, summarize_latency
from nld_lora.evaluation.plots import plot_accuracy_vs_speed, plot_latency_cdf, primary_metric
from nld_lora.evaluation.sandbox import SandboxLimits, SandboxUnavailable, isolation
from nld_lora.evaluation.scorers import DEFAULT_ANSWER_PATTERN, ScorerError, score_answer, score_reference, scorer_for
from nld_lora.intervals import bootstrap_ratio
from nld_lora.modes import Plan, diffusion_grid, mode_plan

EVAL_SCHEMA_VERSION = 1


@dataclass
class CostSettings:
    usd_per_hour: float | None = None  # per device; None: report tokens per device-hour instead of $


@dataclass
class EvalConfig:
    max_new_tokens: int = bounded(96, ge=1)
    batch_size: int = bounded(8, ge=1)  # throughput batch (accuracy runs use it too)
    latency_prompts: int = bounded(16, ge=1)  # requests timed one at a time (batch 1) for the latency percentiles
    limit: int | None = bounded(None, ge=1)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    diffusion: bool = True
    diffusion_blocks: list[int] = field(default_factory=lambda: [4, 8])  # diffusion mode is a curve: every
    diffusion_thresholds: list[float] = field(default_factory=lambda: [0.9, 0.7, 0.5, 0.3, 0.0])  # pair is a point
    answer_pattern: str = DEFAULT_ANSWER_PATTERN
    exec_timeout_s: float = bounded(10.0, gt=0)  # wall clock per program, in the sandbox
    exec_memory_mb: int = bounded(1024, ge=64)  # per program, all its processes together
    unsafe_exec: bool = False  # where no sandbox is available, run generated code unisolated anyway
    bootstrap: int = bounded(1000, ge=1)
    seed: int = 0
    sampling_seeds: int = bounded(3, ge=1)  # with decode.temperature > 0: accuracy runs repeated with this many decode seeds
    cost: CostSettings = field(default_factory=CostSettings)
    baseline: str | None = None  # a Hugging Face causal LM folder (the model served today), greedy and with
    # transformers' prompt lookup, batch 1
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks (extra nld_lora[eval]), per mode
    task_dir: str | None = None  # folder of task YAMLs (include_path), e.g. local JSONL tasks for offline use
    task_limit: int | None = bounded(None, ge=1)  # documents per task


def read_eval_records(path: str | Path, limit: int | None = None) -> tuple[list[dict[str, Any]], list[dict]]:
    """JSONL eval records, each with a `prompt` and the fields of one scorer; errors name the file and line.
    Returns (records, invalid): execution records whose test cannot run are set aside with their line and reason."""
    records: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScorerError(f"{where}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ScorerError(f"{where}: needs a string 'prompt' field")
        record["_scorer"] = scorer_for(record, where)
        if record["_scorer"] == "execution":
            if not all(isinstance(record[k], str) for k in ("test", "entry_point")):
                raise ScorerError(f"{where}: 'test' and 'entry_point' must be strings")
            problem = check_test_code(record["test"], record["entry_point"])
            if problem:
                invalid.append({"line": n, "reason": problem})
                continue
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ScorerError(f"{path}: no eval records" + (f" that can be scored ({len(invalid)} invalid: "
                                                        f"line {invalid[0]['line']}: {invalid[0]['reason']})"
                                                        if invalid else ""))
    return records, invalid


def score(record: dict[str, Any], output: str, cfg: EvalConfig) -> tuple[dict[str, float], str | None]:
    """The record's metrics for one generated output (the scorer its fields chose), and why an execution did not
    pass (None otherwise)."""
    if record["_scorer"] == "execution":
        result = run_execution(record["prompt"], output, record["test"], record["entry_point"],
                               SandboxLimits(timeout_s=cfg.exec_timeout_s, memory_mb=cfg.exec_memory_mb),
                               allow_unisolated=cfg.unsafe_exec)
        return {"pass@1": float(result.passed)}, None if result.passed else f"{result.status}: {result.detail}"
    if record["_scorer"] == "answer":
        return score_answer(output, str(record["answer"]), cfg.answer_pattern), None
    return score_reference(output, record["reference"]), None


def score_all(records: list[dict[str, Any]], texts: list[str], cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    """Metrics per record, and the records whose program did not pass ({record, reason})."""
    scored = [score(r, text, cfg) for r, text in zip(records, texts)]
    return [m for m, _ in scored], [{"record": i, "reason": why} for i, (_, why) in enumerate(scored) if why]


def eval_plan(adapter: str | None, cfg: EvalConfig) -> Plan:
    """The modes eval compares: AR, the diffusion grid, self-speculation without and with the adapter."""
    return mode_plan(adapters={"self_spec+adapter": adapter} if adapter is not None else None,
                     diffusion=diffusion_grid(cfg.diffusion_blocks, cfg.diffusion_thresholds) if cfg.diffusion else None)


def run_mode(model: Any, records: list[dict], plan: dict[str, Any], cfg: EvalConfig,
             progress: bool = False) -> dict[str, Any]:
    """Accuracy and throughput at cfg.batch_size, then latency one request at a time."""
    prompts = [r["prompt"] for r in records]
    common = {"max_new_tokens": cfg.max_new_tokens, "settings": cfg.decode, "progress": progress, **plan}
    res = model.generate(prompts, batch_size=cfg.batch_size, **common)
    per_record, failures = score_all(records, completions(model, res.sequences), cfg)
    spread = {}
    if cfg.decode.temperature > 0:  # sampled: the same runs under other decode seeds, the spread of each mean
        means = [_means(per_record)]
        for k in range(1, cfg.sampling_seeds):
            again = model.generate(prompts, batch_size=cfg.batch_size,
                                   **{**common, "settings": cfg.decode.replace(seed=cfg.decode.seed + k)})
            means.append(_means(score_all(records, completions(model, again.sequences), cfg)[0]))
        spread = {m: {"seeds": len(means), "min": min(x[m] for x in means), "max": max(x[m] for x in means),
                      "std": statistics.pstdev(x[m] for x in means)} for m in means[0]}
    timed = model.generate(prompts[: cfg.latency_prompts], batch_size=1, **common)
    latency = [request_latency(s.token_times, s.wall_s) for s in timed.stats.requests]
    return {"sequences": res.sequences, "per_record": per_record, "failures": failures,
            "tokens_per_s": res.stats.tokens_per_s,
            "tokens_per_s_batch1": timed.stats.tokens_per_s, "tpf": res.stats.tpf,
            "latency": summarize_latency(latency), "e2el_ms": [r["e2el_ms"] for r in latency], "seed_spread": spread}


def completions(model: Any, sequences: list[list[int]]) -> list[str]:
    """Generated text as a scorer sees it: special tokens (the EOS that ended a request) left out."""
    return [model.tokenizer.decode(seq, skip_special_tokens=True) for seq in sequences]


def _means(per_record: list[dict[str, float]]) -> dict[str, float]:
    names = {m for rec in per_record for m in rec}
    return {m: statistics.fmean(rec[m] for rec in per_record if m in rec) for m in names}


def run_baseline(baseline: Any, records: list[dict], lookup: bool, cfg: EvalConfig) -> dict[str, Any]:
    """The baseline model on the same records, one request at a time (its throughput is batch 1 too)."""
    res = baseline.run([r["prompt"] for r in records], cfg.max_new_tokens, lookup)
    latency = [request_latency(t, w) for t, w in zip(res["token_times"], res["walls"])][: cfg.latency_prompts]
    per_record, failures = score_all(records, res["texts"], cfg)
    return {"sequences": res["sequences"], "per_record": per_record, "failures": failures,
            "tokens_per_s": res["tokens_per_s"], "tokens_per_s_batch1": res["tokens_per_s"], "tpf": None,
            "latency": summarize_latency(latency), "e2el_ms": [r["e2el_ms"] for r in latency], "seed_spread": {}}


def evaluate(model: Any, prompts: str | Path, out_dir: str | Path, cfg: EvalConfig | None = None, *,
             adapter: str | None = None, extra: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every mode on the eval prompts; write eval.json and eval.md into out_dir; return the result.
    extra: more top-level fields for eval.json (the recipe records what produced it). progress: a bar over the
    modes and one per decoding call."""
    cfg = cfg or EvalConfig()
    check_ranges(cfg)
    cfg = dataclasses.replace(cfg, decode=cfg.decode.resolved(model.block_size).validate())  # the caller's stays
    if cfg.decode.auto_draft:
        raise ValueError("eval: decode.draft_len must be a fixed length")
    records, invalid = read_eval_records(prompts, cfg.limit)
    executes = any(r["_scorer"] == "execution" for r in records)
    if executes and isolation().bwrap is None and not cfg.unsafe_exec:
        raise SandboxUnavailable(f"{prompts}: records with test + entry_point run generated code, and this machine "
                                 "has no sandbox (bubblewrap): install it (`apt-get install bubblewrap`), or opt "
                                 "in to running the code unisolated with unsafe_exec=true")
    out = writable_dir(out_dir)
    baseline = None
    if cfg.baseline:
        from nld_lora.evaluation.baseline import Baseline

        baseline = Baseline(cfg.baseline, model.device)
    plans = eval_plan(adapter, cfg)
    runs: dict[str, Any] = {}
    with tqdm(total=len(plans) + (2 if baseline is not None else 0), desc="eval modes", unit="mode",
              disable=not progress) as bar:
        for label, plan in plans.items():
            bar.set_postfix_str(label)
            runs[label] = run_mode(model, records, plan, cfg, progress)
            bar.update(1)
        if baseline is not None:
            for label, lookup in (("baseline", False), ("baseline+lookup", True)):
                bar.set_postfix_str(label)
                runs[label] = run_baseline(baseline, records, lookup, cfg)
                bar.update(1)
    metrics = sorted({m for run in runs.values() for rec in run["per_record"] for m in rec})
    modes: dict[str, Any] = {}
    for label, run in runs.items():
        acc = {}
        for m in metrics:
            values = [rec[m] for rec in run["per_record"] if m in rec]
            ar_values = [rec[m] for rec in runs["ar"]["per_record"] if m in rec]
            mean, lo, hi = bootstrap_ratio(values, n_boot=cfg.bootstrap, seed=cfg.seed)
            delta, dlo, dhi = bootstrap_ratio([a - b for a, b in zip(values, ar_values)], n_boot=cfg.bootstrap,
                                              seed=cfg.seed)
            acc[m] = {"mean": mean, "ci95": [lo, hi], "delta_vs_ar": delta, "delta_ci95": [dlo, dhi]}
        tps = run["tokens_per_s_batch1"], run["tokens_per_s"]
        cost = ({"usd_per_million_tokens_batch1": cost_per_million_tokens(cfg.cost.usd_per_hour, tps[0]),
                 f"usd_per_million_tokens_batch{cfg.batch_size}": cost_per_million_tokens(cfg.cost.usd_per_hour,
                                                                                          tps[1])}
                if cfg.cost.usd_per_hour else
                {"tokens_per_device_hour_batch1": 3600 * tps[0],
                 f"tokens_per_device_hour_batch{cfg.batch_size}": 3600 * tps[1]})
        modes[label] = {"accuracy": acc, "seed_spread": run["seed_spread"], "execution_failures":
                        {"count": len(run["failures"]), "first": run["failures"][:5]},
                        "tpf": run["tpf"], "tokens_per_s_batch1": tps[0],
                        f"tokens_per_s_batch{cfg.batch_size}": tps[1], "latency": run["latency"], "cost": cost,
                        "identical_to_ar": (None if label.startswith("baseline") or cfg.decode.temperature > 0
                                            else run["sequences"] == runs["ar"]["sequences"])}  # greedy only
    result = {"schema_version": EVAL_SCHEMA_VERSION, "prompts": str(prompts), "n_records": len(records),
              "scorers": sorted({r["_scorer"] for r in records}), "model": model.name_or_path,
              "adapter": adapter, "baseline": cfg.baseline, "settings": {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                                               "latency_prompts": min(cfg.latency_prompts, len(records)),
                                               "block_size": cfg.decode.block_size,
                                               "draft_len": cfg.decode.draft_len,
                                               "threshold": cfg.decode.threshold,
                                               "temperature": cfg.decode.temperature,
                                               "usd_per_hour": cfg.cost.usd_per_hour},
              "invalid_records": invalid, "sandbox": isolation().describe() if executes else None,
              "modes": modes}
    result.update(extra or {})
    metric = primary_metric(modes)
    result["plots"] = {"accuracy_vs_speed": plot_accuracy_vs_speed(modes, metric, out / "accuracy_vs_speed.png"),
                       "latency_cdf": plot_latency_cdf({k: r["e2el_ms"] for k, r in runs.items()},
                                                       out / "latency_cdf.png")}
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "eval.json")
    (out / "eval.md").write_text(eval_markdown(result))
    return result


def eval_markdown(result: dict[str, Any]) -> str:
    """eval.md: a title, then eval_tables."""
    return "\n".join([f"# Eval: {result['n_records']} records of {result['prompts']}", "", *eval_tables(result)])


def eval_tables(result: dict[str, Any], plots_at: str = "") -> list[str]:
    """Accuracy per mode (delta to AR with its interval), then latency percentiles, throughput and cost; plot links
    prefixed with plots_at (the eval folder, seen from where the lines are written)."""
    modes = result["modes"]
    metrics = sorted({m for mode in modes.values() for m in mode["accuracy"]})
    lines = [f"Scorers: {', '.join(result['scorers'])}; settings: {json.dumps(result['settings'])}", "",
             "| mode | " + " | ".join(metrics) + " | identical tokens to AR |",
             "|---|" + "---:|" * len(metrics) + "---|"]
    for label, mode in modes.items():
        cells = []
        for m in metrics:
            a = mode["accuracy"][m]
            delta = "" if label == "ar" else (f" ({a['delta_vs_ar']:+.3f} [{a['delta_ci95'][0]:+.3f}, "
                                              f"{a['delta_ci95'][1]:+.3f}])")
            cells.append(f"{a['mean']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]{delta}")
        same = {True: "yes", False: "no", None: "n/a"}[mode["identical_to_ar"]]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {same} |")
    lines += ["", "Latency per request at batch 1 (ms: mean / p50 / p90 / p99), throughput and cost:", "",
              "| mode | TPF | ttft_ms | tpot_ms | itl_ms | e2el_ms | tok/s batch 1 | tok/s batch N | cost |",
              "|---|---:|---|---|---|---|---:|---:|---|"]
    for label, mode in modes.items():
        lat = " | ".join("{mean:.1f} / {p50:.1f} / {p90:.1f} / {p99:.1f}".format(**mode["latency"][m])
                         for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"))
        batch_key = next(k for k in mode if k.startswith("tokens_per_s_batch") and k != "tokens_per_s_batch1")
        cost = "; ".join(f"{k}: {v:,.2f}" for k, v in mode["cost"].items())
        tpf = "-" if mode["tpf"] is None else f"{mode['tpf']:.3f}"
        lines.append(f"| {label} | {tpf} | {lat} | {mode['tokens_per_s_batch1']:.1f} | "
                     f"{mode[batch_key]:.1f} | {cost} |")
    spread = {label: mode["seed_spread"] for label, mode in modes.items() if mode["seed_spread"]}
    if spread:
        lines += ["", "Sampled decoding: each metric's mean under several decode seeds (min .. max, std):", ""]
        lines += [f"- {label}: " + "; ".join(f"{m} {v['min']:.3f} .. {v['max']:.3f} (std {v['std']:.3f}, "
                                             f"{v['seeds']} seeds)" for m, v in sorted(s.items()))
                  for label, s in spread.items()]
    failing = {label: mode["execution_failures"]["count"] for label, mode in modes.items()
               if mode.get("execution_failures", {}).get("count")}
    if failing or result.get("invalid_records"):
        lines += ["", f"Execution ({result.get('sandbox')}): programs that did not pass per mode: "
                  + (", ".join(f"{label} {n}" for label, n in failing.items()) or "none")
                  + f"; records left out because their test cannot run: {len(result.get('invalid_records', []))}"
                  + "".join(f"\n- line {r['line']}: {r['reason']}" for r in result.get("invalid_records", [])[:5])
                  + "\n\nThe first failures of each mode, with their reason, are in eval.json (execution_failures)."]
    lines += ["", f"![accuracy vs speed]({plots_at}{result['plots']['accuracy_vs_speed']})",
              f"![latency CDF]({plots_at}{result['plots']['latency_cdf']})"]
    lines += ["", "Greedy self-speculation must score exactly what AR scores: `identical tokens to AR` says whether "
              "its tokens equal AR's; diffusion mode is lossy and shows its accuracy cost as the delta.", ""]
    return lines
