"""Per-request latency from the runtime's token times, in the serving benchmarks' names (vLLM `bench serve`).

ttft_ms: time to first token (prefill + the first token); tpot_ms: time per output token after the first,
(e2el - ttft) / (n - 1); itl_ms: inter-token latency, the gaps between successive emissions (a self-speculation
cycle emits several tokens at once: one gap per cycle, as a streaming server would send them); e2el_ms: end to end.
Each is summarised as mean, p50, p90 and p99 over requests (ITL over all gaps). Cost: $ per million output tokens
= $/device-hour / (output tokens/s x 3600) x 1e6.
"""

from __future__ import annotations

import statistics
from typing import Any

LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def request_latency(token_times: list[float], wall_s: float) -> dict[str, Any]:
    """One request's TTFT, TPOT, end-to-end latency (ms) and its inter-emission gaps (ms)."""
    if not token_times:
        return {"ttft_ms": 1e3 * wall_s, "tpot_ms": 0.0, "e2el_ms": 1e3 * wall_s, "gaps_ms": []}
    emissions = sorted(set(token_times))
    ttft, e2el = token_times[0], max(wall_s, token_times[-1])
    tpot = (token_times[-1] - ttft) / (len(token_times) - 1) if len(token_times) > 1 else 0.0
    return {"ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * tpot, "e2el_ms": 1e3 * e2el,
            "gaps_ms": [1e3 * (b - a) for a, b in zip(emissions, emissions[1:])]}


def summarize_latency(requests: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, p50, p90, p99}} over requests (itl_ms over every gap of every request)."""
    series = {m: [r[m] for r in requests] for m in ("ttft_ms", "tpot_ms", "e2el_ms")}
    series["itl_ms"] = [g for r in requests for g in r["gaps_ms"]]
    return {m: {"mean": statistics.fmean(v) if v else 0.0, **{f"p{q}": percentile(v, q) for q in PERCENTILES}}
            for m, v in ((m, series[m]) for m in LATENCY_METRICS)}


def cost_per_million_tokens(usd_per_hour: float, tokens_per_s: float) -> float:
    """$ per million output tokens at a measured throughput on one device."""
    return usd_per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s > 0 else float("inf")
