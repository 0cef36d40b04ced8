"""draft_len="auto": pick each cycle's draft length (0 = an AR step) by expected tokens per second, from measured
acceptance and measured forward costs. The rules it follows are listed in docs/design.md ("The decode engine").
"""

from __future__ import annotations

import time
from statistics import median
from typing import NamedTuple

import torch

from nld_lora.acceptance import expected_tokens
from nld_lora.adapter.twins import forward_costs

PRIOR_RATE = 0.6
PRIOR_WEIGHT = 4.0
TIMING_REPEATS = 7  # forwards per width measured (after one warm-up); the median is kept
TIME_WINDOW = 9  # the last cycles a time estimate is the median of, so one spike (a page fault) cannot set a price
AR_REPROBE = 32  # cycles without an AR step after which the planner takes one, so AR's price stays current
LOOKUP_RETRY = 8  # cycles with lookup drafts on offer but none verified, after which the best lookup choice runs:
# lookup rates learn only from verified lookups, so one unlucky start could keep a prompt on AR steps
AR_RUN_MAX = 8  # AR steps one choice may take once AR won the last choices: those steps change only AR's own price,
# so planning each one again would choose the same
DRAFT_REPROBE = 128  # steps without a diffusion cycle after which the best diffusion choice runs once: a price set by
# one slow cycle is otherwise never corrected, since drafting is not chosen again; one cycle in 128 bounds the cost
DRAFT_REPROBE_MAX = 1024  # the longest gap between re-probes: each one after which drafting still loses doubles the
# gap, so where no draft cycle pays the re-probes cost ever less; a choice drafting wins resets it
MIN_OBSERVED = 2  # cycles of one (rows, kind, k) after which its observed wall time replaces the prediction
CYCLE_KINDS = ("ar", "draft", "lookup")  # AR steps, diffusion-draft cycles, lookup-only cycles: each its own ratio


def forward_seconds(batch, width: int) -> float:
    """Predicted wall time of a forward of `width` tokens on this batch: linear between measured widths 1, 2, 4, 8,
    ... (measure_forwards), per power-of-two bucket of batch rows, eager or compiled. The powers of two below `width`
    are measured with it, and the one above where the batch's cache has room for it (else past the widest measured,
    that one's time). A bucket that rows finishing mid-decode reach is priced from the measured bucket nearest to
    it instead, so no measurement forwards run inside a decode."""
    low = 1 << (width.bit_length() - 1)
    points = [1 << i for i in range(low.bit_length())]
    if low != width and 2 * low <= batch.cache.capacity - max(batch.lengths):
        points.append(2 * low)
    if rows_bucket(len(batch)) != rows_bucket(batch.initial_rows):
        borrowed = measured_nearby(batch, points)
        if borrowed:
            return between_widths(borrowed, width)
    return between_widths(measure_forwards(batch, points), width)


def measured_nearby(batch, widths: list[int]) -> dict[int, float]:
    """Forward times at `widths` from the nearest rows bucket (above first, then below) that has them all measured
    in this process, same device and compile state; empty when none has."""
    costs = forward_costs(batch.model)
    device, compiled, own = cost_key(batch)
    buckets = sorted({key[2] for key in costs if key[:2] == (device, compiled) and key[2] != own},
                     key=lambda b: (b < own, abs(b.bit_length() - own.bit_length())))
    for bucket in buckets:
        if all((device, compiled, bucket, w) in costs for w in widths):
            return {w: costs[(device, compiled, bucket, w)] for w in widths}
    return {}


def cost_key(batch) -> tuple[str, bool, int]:
    """(device, compiled, rows bucket): where a forward time of this batch is kept (twins.forward_costs), with the
    width after it."""
    model = batch.model
    return str(model.device), model.encoder._compiled_call_impl is not None, rows_bucket(len(batch))


def between_widths(times: dict[int, float], width: int) -> float:
    """A forward's time at `width` from times measured at other widths (width -> time, the narrowest at or below
    `width`): linear between the measured widths around it; past the widest, that one's time. The planner and the
    report's price line (report/speed.py) both price widths this way."""
    lo = max(w for w in times if w <= width)
    hi = min((w for w in times if w >= width), default=lo)
    return times[lo] if hi == lo else times[lo] + (times[hi] - times[lo]) * (width - lo) / (hi - lo)


def measure_forwards(batch, widths: list[int]) -> dict[int, float]:
    """Median wall time of a verify-shaped forward at each of `widths` tokens, logits included (not counted, not
    kept: the next forward overwrites its cache slots); measured once per process and (device, compiled, rows
    bucket, width). The widths not measured yet are measured together in TIMING_REPEATS rounds of one forward each
    (after a warm-up round), so a slow spell of the machine moves every width's price alike. Each width stands alone
    (not floored at the narrower widths' times), so one slow spell cannot price every wider forward."""
    model = batch.model
    costs = forward_costs(model)
    prefix = cost_key(batch)
    missing = sorted({w for w in widths if prefix + (w,) not in costs})
    times: dict[int, list[float]] = {w: [] for w in missing}
    tokens = {w: torch.full((len(batch), w), model.mask_token_id, device=model.device) for w in missing}
    for rep in range(TIMING_REPEATS + 1 if missing else 0):
        for width in missing:
            _sync(model.device)
            t0 = time.perf_counter()
            batch.forward(tokens[width], "verify", counted=[False] * len(batch))  # logits at every position, as a
            # verify (and a draft but one) computes them, or wide forwards would read cheap
            _sync(model.device)
            if rep:  # the first round warms up
                times[width].append(time.perf_counter() - t0)
    for width in missing:
        costs[prefix + (width,)] = median(times[width])
    return {w: costs[prefix + (w,)] for w in widths}


def rows_bucket(rows: int) -> int:
    """The power of two at or above `rows`: forward costs, and what a planner learnt, are kept per bucket."""
    return 1 << (rows - 1).bit_length()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prior(rates: list[float] | None, max_len: int) -> list[float]:
    """max_len prior rates clamped to [0.05, 0.95]: `rates` padded with its last value, or PRIOR_RATE."""
    rates = [min(max(float(r), 0.05), 0.95) for r in (rates or [])]
    return (rates + [rates[-1] if rates else PRIOR_RATE] * max_len)[:max_len]


class _Rates:
    """Per-position acceptance counts with a prior worth PRIOR_WEIGHT cycles."""

    def __init__(self, prior: list[float]):
        self.prior = prior
        self.attempts = [0] * len(prior)
        self.accepts = [0] * len(prior)

    def values(self, prior: list[float] | None = None) -> list[float]:
        """Rates from these counts and `prior` (default: this one's own) worth PRIOR_WEIGHT cycles."""
        return [self.value(j, p) for j, p in enumerate(prior or self.prior)]

    def value(self, j: int, prior: float | None = None) -> float:
        """The rate of draft position j + 1 (values()'s j-th, without building the others)."""
        p = self.prior[j] if prior is None else prior
        return (self.accepts[j] + PRIOR_WEIGHT * p) / (self.attempts[j] + PRIOR_WEIGHT)

    def record_span(self, n_accepted: int, lo: int, hi: int) -> None:
        """One row's verdict on draft positions lo+1..hi (0-based lo..hi-1) of a cycle that accepted n_accepted
        drafts: positions up to n_accepted + 1 were reached, those up to n_accepted accepted (acceptance.py's
        rule, restricted to the span); nothing when the row stopped before the span."""
        for j in range(lo, min(n_accepted + 1, hi)):
            self.attempts[j] += 1
            self.accepts[j] += j < n_accepted


class Choice(NamedTuple):
    """One cycle's plan: k drafts (0: an AR step); lookup: the rows' lookup drafts alone, cut to k; lookup_cut, for
    a diffusion cycle with lookups on offer: None, the lookups lead the drafts (the diffusion pass drafts past
    them), 0, diffusion drafts alone (a poor match priced the merged cycle below them)."""

    k: int
    lookup: bool = False
    lookup_cut: int | None = None


class DraftPlanner:
    """Chooses the next cycle for one decode batch: an AR step, k diffusion drafts (1..max_len), or, when every row
    found one, the prompt-lookup drafts cut to k tokens (their own rates, prior PRIOR_RATE, and per length of the
    n-gram the draft matched; cost: one verify forward of width k + 1). Where rows have lookup drafts, a diffusion
    cycle verifies lookup + diffusion tail (the loop merges them), so its expected tokens use the lookup rates over
    the lookup's span and the diffusion rates past it, and its verdicts are recorded the same way; it is weighed
    against diffusion drafts alone (Choice.lookup_cut 0), which win where the lookup on offer is poor."""

    def __init__(self, max_len: int, quadratic: bool, prior: list[float] | None = None,
                 memory: dict | None = None, memory_key: tuple = ()):
        """prior: diffusion rates to start from (an adapter's evaluated ones); memory: a previous planner's
        remember() of the same adapter and layout, which takes precedence (measured in this process); memory_key:
        where the runtime keeps what this planner learns (decoding/loops.py)."""
        self.max_len = max_len
        self.quadratic = quadratic
        memory = memory or {}
        self.diffusion = _Rates(_prior(memory.get("diffusion") or prior, max_len))
        self.lookup = _Rates(_prior(None, max_len))  # lookups are as good as each prompt repeats itself: not carried
        self.lookup_by_order: dict[int, _Rates] = {}  # matched n-gram length -> those lookups' counts (prior: the
        # pooled rates): a short match is right far less often than a long one
        self.row_counts: dict[int, tuple[_Rates, _Rates]] = {}  # request id -> its own (diffusion, lookup) counts
        self.ratio_samples: dict[str, list[float]] = {kind: list(memory.get("ratio_samples", {}).get(kind, []))
                                                      for kind in CYCLE_KINDS}  # the last TIME_WINDOW measured /
        # predicted cycle times per kind of cycle
        self.observed: dict[tuple, list[float]] = {key: list(v) for key, v in (memory.get("observed") or {}).items()}
        # (rows, kind, k) -> the last TIME_WINDOW wall seconds of that choice: what it really cost here
        self._since_ar = 0  # cycles since the last AR step
        self._since_draft = memory.get("since_draft", 0)  # AR steps and lookup cycles since the last diffusion
        # cycle, counted on across decode batches: a batch of a few dozen steps never reached DRAFT_REPROBE alone
        self._reprobe_gap = memory.get("reprobe_gap", DRAFT_REPROBE)  # steps without a diffusion cycle before the
        # next re-probe (DRAFT_REPROBE_MAX), carried across decode batches as the count is
        self._reprobed = False  # the last choice was a re-probe: the next one says whether drafting won after it
        self._ar_wins = 0  # choices in a row that AR won (ar_run)
        self._lookups_skipped = 0  # cycles since lookup drafts were last verified, counting those that offered them
        self._chosen: tuple = (0, Choice(0))
        self.memory_key = memory_key
        self._started = self._predicted = 0.0
        self._pending: tuple[str, int, int] | None = None  # (kind, k, AR steps) of the cycle finish() named, not
        # yet timed
        self._costs: dict[int, list[float]] = {}  # batch rows -> predicted seconds per cycle for k = 0..max_len

    def rates(self) -> list[float]:
        """The diffusion drafts' per-position rates as currently estimated."""
        return self.diffusion.values()

    def remember(self) -> dict:
        """What this planner learnt, for the next decode batch of the same adapter and layout: the diffusion rates
        become its prior (worth PRIOR_WEIGHT cycles again, so each batch still adapts to its own prompts) and the
        costs carry over, and so does the count of steps since the last diffusion cycle (DRAFT_REPROBE). Lookup rates
        are not carried: they are as good as each prompt repeats itself, and a pessimistic carried estimate is never
        corrected once lookups stop being chosen. Without it every batch of a batch-1 run started from the adapter's
        evaluated rates, which the deployed loop does not reach."""
        return {"diffusion": self.diffusion.values(), "ratio_samples": {kind: list(v) for kind, v in self.ratio_samples.items()},
                "observed": {key: list(v) for key, v in self.observed.items()}, "since_draft": self._since_draft,
                "reprobe_gap": self._reprobe_gap}

    @property
    def time_ratio(self) -> dict[str, float | None]:
        """Measured / predicted cycle time per kind of cycle: the median of its samples (None: none measured)."""
        return {kind: median(v) if v else None for kind, v in self.ratio_samples.items()}

    def ratios(self) -> dict[str, float]:
        """Measured / predicted time per kind of cycle (CYCLE_KINDS), as choices price it: its own ratio; until one
        is measured, the AR steps' ratio, else the largest measured one, else 1 (the runtime's overhead per forward
        is shared, and an unmeasured kind must not look cheaper than a measured one)."""
        measured = self.time_ratio
        known = [r for r in measured.values() if r is not None]
        fallback = measured["ar"] if measured["ar"] is not None else max(known, default=1.0)
        return {kind: fallback if r is None else r for kind, r in measured.items()}

    def _own(self, rid: int) -> tuple[_Rates, _Rates]:
        if rid not in self.row_counts:
            self.row_counts[rid] = (_Rates([0.0] * self.max_len), _Rates([0.0] * self.max_len))
        return self.row_counts[rid]

    def lookup_rates(self, order: int | None = None) -> list[float]:
        """Lookup rates for a draft that matched an n-gram of this length: that length's counts with the pooled
        rates as the prior (None: the pooled rates)."""
        pooled = self.lookup.values()
        return self.lookup_by_order[order].values(pooled) if order in self.lookup_by_order else pooled

    def row_rates(self, rid: int | None, lookup_order: int | None = None) -> tuple[list[float], list[float]]:
        """(diffusion, lookup) rates of one request: its own counts with the pooled rates (lookups: those of its
        draft's matched n-gram length) as the prior (None: the pooled rates)."""
        pooled = self.diffusion.values(), self.lookup_rates(lookup_order)
        if rid is None:
            return pooled
        own = self._own(rid)
        return own[0].values(pooled[0]), own[1].values(pooled[1])

    def critical(self, rows: list[int], committed: list[int]) -> int | None:
        """The request the batch waits for: the fewest committed tokens, ties broken by the lowest own r_1 (None
        for a single row: its rates are the pooled ones)."""
        if len(rows) < 2:
            return None
        least = min(committed)
        tied = [rid for rid, n in zip(rows, committed) if n == least]
        if len(tied) == 1:
            return tied[0]
        pooled_r1 = self.diffusion.value(0)
        return min(tied, key=lambda rid: self._own(rid)[0].value(0, pooled_r1))

    def cycle_seconds(self, batch, k: int) -> float:
        if k == 0:
            return forward_seconds(batch, 1)
        if self.quadratic:
            return forward_seconds(batch, (k + 1) * (k + 2))
        return 2 * forward_seconds(batch, k + 1)

    def choose(self, batch, lookup_len: int = 0, verifying: int = 0, row: int | None = None,
               lookup_order: int | None = None) -> Choice:
        """The Choice with the most expected tokens per second for request `row` (critical(); None: the pooled
        rates); lookup_len: that row's lookup draft length when every row found one, else 0, and lookup_order the
        n-gram length it matched (lookup_rates). verifying (single-forward mode): the drafts this cycle's forward
        verifies, which set its real width. Closes the previous cycle's clock (finish) and starts this one's."""
        self._close()
        if len(batch) not in self._costs:  # widest first: its measurement takes every narrower width along
            self._costs[len(batch)] = [self.cycle_seconds(batch, k) for k in range(self.max_len, -1, -1)][::-1]
        costs, rows = self._costs[len(batch)], len(batch)
        if not self.ratio_samples["ar"] or self._since_ar >= AR_REPROBE:  # time an AR step first (and again
            # every AR_REPROBE cycles): the one-off width measurements misjudge it, and every unmeasured kind takes
            # its ratio
            self._ar_wins = 0
            return self._start(costs[0], rows, Choice(0))
        ratios = self.ratios()
        best, best_rate, predicted = Choice(0), 1.0 / self.seconds(rows, "ar", 0, costs[0], ratios), costs[0]
        diffusion, lookup = self.row_rates(row, lookup_order)
        lookup = lookup[:lookup_len]
        best_draft: tuple = (0.0, Choice(0), 0.0)  # (rate, choice, predicted) of the best diffusion choice: over
        # lookup + diffusion tail (cut None), or diffusion drafts alone (cut 0)
        for cut in (None, 0) if lookup_len else (None,):
            span = lookup_len if cut is None else 0
            tokens, survive = 1.0, 1.0
            for k, r in enumerate(diffusion, start=1):
                survive *= lookup[k - 1] if k <= span else r
                tokens += survive
                rate = tokens / self.seconds(rows, "draft", k, costs[k], ratios)
                if rate > best_draft[0]:
                    best_draft = (rate, Choice(k, False, cut), costs[k])
        drafting_wins = best_draft[0] > best_rate
        if drafting_wins:  # drafting pays again: re-probes at the first gap once it stops
            self._reprobe_gap = DRAFT_REPROBE
        elif self._reprobed:  # the re-probe's cycle is priced in now, and drafting still loses: back off
            self._reprobe_gap = min(2 * self._reprobe_gap, DRAFT_REPROBE_MAX)
        reprobe = self._since_draft >= self._reprobe_gap and self.max_len > 0  # lookups on offer do not put it
        # off: at batch 1 a 1-gram match is on offer nearly every cycle
        self._reprobed = reprobe and not drafting_wins
        if drafting_wins or reprobe:
            best, best_rate, predicted = best_draft[1], best_draft[0], best_draft[2]
        best_lookup: tuple = (0.0, Choice(0), 0.0)  # (rate, choice, predicted)
        for k in range(1, lookup_len + 1):  # lookup drafts cut to k: a narrower verify, for fewer expected tokens
            verify = costs[k] / 2  # a linear cycle's draft + verify of width k + 1 (cycle_seconds), less the draft:
            # derived from the cycle costs, not priced anew per k (that is width lookups on every choice)
            rate = expected_tokens(lookup, k) / self.seconds(rows, "lookup", k, verify, ratios)
            if rate >= best_lookup[0]:  # a tie goes to the longer cut
                best_lookup = (rate, Choice(k, True), verify)
        if lookup_len and not reprobe and (best_lookup[0] > best_rate or self._lookups_skipped >= LOOKUP_RETRY):
            best, predicted = best_lookup[1], best_lookup[2]
        self._ar_wins = self._ar_wins + 1 if best.k == 0 else 0
        verified_lookups = best.lookup or (best.k > 0 and lookup_len > 0)  # a diffusion cycle verifies them too
        self._lookups_skipped = 0 if verified_lookups else self._lookups_skipped + (lookup_len > 0)
        if self.quadratic:  # ranked by the steady state; this forward's width also depends on the drafts it verifies
            k = best.k
            predicted = forward_seconds(batch, (verifying + 1) * (k + 2) if k else verifying + 1)
        return self._start(predicted, rows, best)

    def ar_run(self) -> int:
        """AR steps to take for the AR step just chosen before choosing again: a run doubling with each choice in a
        row that AR won, 1, 2, 4, up to AR_RUN_MAX (the loop cuts it short when a row finishes or lookup drafts come
        on offer). AR steps move only AR's own price, so planning each of them again chose the same but for a
        narrow call, where either choice costs about the same."""
        return min(AR_RUN_MAX, 1 << (self._ar_wins - 1)) if self._ar_wins else 1

    def _start(self, predicted: float, rows: int, choice: Choice) -> Choice:
        """Start the clock of the cycle just chosen."""
        self._predicted, self._chosen = predicted, (rows, choice)
        self._started = time.perf_counter()
        return choice

    def seconds(self, rows: int, kind: str, k: int, predicted: float, ratios: dict[str, float]) -> float:
        """Expected wall time of a cycle: the median observed for this (rows, kind, k) once it ran MIN_OBSERVED
        times (linear mode), else the predicted forwards times this kind's measured/predicted ratio (ratios:
        ratios(), computed once per choice)."""
        seen = None if self.quadratic else self.observed.get((rows, kind, k))  # single-forward: a cycle's width
        # also depends on the drafts it verifies (the previous choice), so one k's observed times are confounded
        return median(seen) if seen and len(seen) >= MIN_OBSERVED else predicted * ratios[kind]

    def finish(self, k: int, lookup: bool = False, steps: int = 1) -> None:
        """Name the cycle that ran since choose(): k = 0 an AR step (`steps` of them: an ar_run, timed per step),
        else a cycle of diffusion drafts, or of lookup drafts alone (lookup). Its clock stops at the next choose(),
        so the time learnt is the whole loop iteration, the bookkeeping after its forwards included (stopping at the
        forwards' tokens left out work that draft cycles do and AR steps do not)."""
        self._pending = ("ar" if k == 0 else "lookup" if lookup else "draft", k, steps)

    def _close(self) -> None:
        """Learn from the finished cycle, if any: its kind's measured/predicted ratio and this very choice's time."""
        if self._pending is None:
            return
        kind, k, steps = self._pending
        self._pending = None
        elapsed = (time.perf_counter() - self._started) / steps
        self._since_ar = 0 if kind == "ar" else self._since_ar + 1
        self._since_draft = 0 if kind == "draft" else self._since_draft + steps
        self.ratio_samples[kind] = (self.ratio_samples[kind] + [elapsed / self._predicted])[-TIME_WINDOW:]
        key = (self._chosen[0], kind, k)
        self.observed[key] = (self.observed.get(key, []) + [elapsed])[-TIME_WINDOW:]

    def record(self, accepted: list[int], drafted: int, lookup: bool = False,
               lookup_lens: list[int] | None = None, rows: list[int] | None = None,
               lookup_orders: list[int] | None = None) -> None:
        """Update the rates with one cycle's verified rows: accepted drafts per row out of `drafted`. lookup: the
        cycle verified lookup drafts only (row i's are lookup_lens[i] long, the rest filler). Otherwise row i's
        first lookup_lens[i] drafts (0 when None) were lookup tokens and the others diffusion drafts. rows: the
        rows' request ids, whose own counts (row_rates) are updated too. lookup_orders: the n-gram length each
        row's lookup matched (lookup_rates), whose counts are updated too."""
        for i, n in enumerate(accepted):
            m = min(lookup_lens[i], drafted) if lookup_lens else (drafted if lookup else 0)
            counts = [(self.diffusion, self.lookup), *([self._own(rows[i])] if rows else [])]
            for diffusion, lookups in counts:
                lookups.record_span(n, 0, m)
                if not lookup:
                    diffusion.record_span(n, m, drafted)
            if lookup_orders and m:
                order = lookup_orders[i]
                if order not in self.lookup_by_order:
                    self.lookup_by_order[order] = _Rates([0.0] * self.max_len)
                self.lookup_by_order[order].record_span(n, 0, m)
