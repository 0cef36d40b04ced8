"""draft_len="auto": the planner's rule, and that adaptive decoding stays lossless and reports its choices."""

import time

import pytest
import torch

from nld_lora.acceptance import expected_tokens
from nld_lora.adapter.twins import forward_costs
from nld_lora.decoding.auto import Choice, DraftPlanner
from tests.helpers import make_adapter, random_prompts, tiny_model


def test_expected_tokens_is_one_plus_the_survival_sum():
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


class _Rows:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _planner_with_costs(rates: list[float], costs: list[float], quadratic: bool = False) -> DraftPlanner:
    planner = DraftPlanner(len(rates), quadratic, prior=rates)
    planner._costs[1] = costs  # seconds per cycle for k = 0..max_len, as forward_seconds would have measured them
    planner.ratio_samples["ar"] = [1.0]  # an AR step was timed as predicted
    return planner


def test_planner_drafts_only_where_positions_pay_for_themselves():
    flat = [1.0] * 5  # drafting costs no more than an AR step: take every position worth anything
    assert _planner_with_costs([0.9] * 4, flat).choose(_Rows(1))[0] == 4
    steep = [1.0, 2.0, 2.2, 2.4, 2.6]  # a cycle costs two forwards: rates of 0.3 never pay for it
    assert _planner_with_costs([0.3] * 4, steep).choose(_Rows(1))[0] == 0
    cliff = [1.0, 1.0, 1.0, 9.0, 9.0]  # positions 3+ cost far more than they return
    assert _planner_with_costs([0.9] * 4, cliff).choose(_Rows(1))[0] == 2


def test_planner_learns_rates_and_the_runtime_overhead():
    planner = _planner_with_costs([0.9] * 4, [1.0, 1.5, 1.6, 1.7, 1.8])
    assert planner.choose(_Rows(1))[0] == 4
    for _ in range(40):
        planner.record([0, 0, 0], drafted=4)  # three rows, no draft accepted
    assert planner.rates()[0] < 0.05 and planner.choose(_Rows(1))[0] == 0
    planner.ratio_samples["draft"] = [1.0]  # diffusion cycles measured as predicted,
    planner.ratio_samples["ar"] = [10.0]  # AR steps far slower than predicted: speculation wins again
    assert planner.choose(_Rows(1))[0] > 0


def test_planner_takes_lookup_drafts_only_while_they_pay(monkeypatch):
    import nld_lora.decoding.auto as auto

    monkeypatch.setattr(auto, "forward_seconds", lambda batch, width: 1.0 + 0.1 * width)  # a measured cost curve
    planner = DraftPlanner(4, quadratic=False, prior=[0.05] * 4)  # diffusion drafts: never worth a draft forward
    planner.ratio_samples["ar"] = [1.0]  # an AR step was timed as predicted
    assert planner.choose(_Rows(1), lookup_len=3) == Choice(3, True)  # lookup prior 0.6: 2.18 tokens for 1.4 s
    monkeypatch.setattr(auto, "forward_seconds", lambda batch, width: 1.0 + 0.5 * width)  # wide verifies cost more:
    steep = DraftPlanner(4, False, [0.05] * 4)
    steep.ratio_samples["ar"] = [1.0]
    assert steep.choose(_Rows(1), lookup_len=3) == Choice(1, True)  # 1.6 tokens for 2 s
    monkeypatch.setattr(auto, "forward_seconds", lambda batch, width: 1.0 + 0.1 * width)
    for _ in range(60):
        planner.record([0], drafted=3, lookup=True)  # but the lookups keep failing
    assert planner.choose(_Rows(1), lookup_len=3) == Choice(0, False)


def test_an_unmeasured_cycle_kind_takes_the_measured_overhead():
    """Speculative cycles start from the AR steps' measured/predicted ratio, not 1: else a runtime overhead seen
    only on AR steps makes speculation look cheaper than it is (the batch-8 regression of issue #22)."""
    planner = _planner_with_costs([0.5] * 4, [1.0, 1.9, 2.0, 2.1, 2.2])
    assert planner.ratios()["draft"] == planner.ratios()["ar"] == planner.ratios()["lookup"] == 1.0
    assert planner.choose(_Rows(1))[0] == 0  # 1.5 tokens for 1.9 s < 1 token per s
    planner.finish(0)
    planner.choose(_Rows(1))  # the AR step's clock stops at the next choice
    measured = planner.time_ratio["ar"]
    assert measured is not None and planner.ratios()["draft"] == planner.ratios()["lookup"] == measured  # until timed
    planner.ratio_samples["lookup"] = [0.5]  # lookup-only cycles cheap: that says nothing about diffusion cycles
    assert planner.ratios()["lookup"] == 0.5 and planner.ratios()["draft"] == measured == planner.ratios()["ar"]
    planner.ratio_samples["ar"] = []
    assert planner.ratios()["draft"] == 0.5 == planner.ratios()["ar"]  # no AR step timed: the largest measured one


def test_a_batch_is_planned_for_the_row_it_waits_for():
    costs = [1.0, 2.0, 2.1, 2.2, 2.3]  # a draft cycle costs two forwards
    planner = _planner_with_costs([0.6] * 4, costs)
    planner._costs[2] = costs
    for _ in range(20):
        planner.record([4, 0], drafted=4, rows=[7, 9])  # request 7 accepts every draft, request 9 none
    assert planner.choose(_Rows(2))[0] == 4  # the pooled rates (r_1 0.5, then about 0.9) would draft
    assert planner.critical([7, 9], [40, 20]) == 9  # the batch waits for the row with the fewest tokens
    assert planner.choose(_Rows(2), row=9)[0] == 0  # whose drafts never pay: an AR step for the whole batch
    assert planner.choose(_Rows(2), row=7)[0] == 4
    assert planner.critical([7, 9], [20, 20]) == 9  # a tie goes to the lower own r_1
    assert planner.critical([7], [20]) is None  # one row: its own rates are the pooled ones
    assert planner.row_rates(9)[0][0] < 0.1 < 0.9 < planner.row_rates(7)[0][0]


def test_merged_lookup_and_diffusion_cycles_are_priced_and_recorded_by_span(monkeypatch):
    import nld_lora.decoding.auto as auto

    monkeypatch.setattr(auto, "forward_seconds", lambda batch, width: 1.0)
    planner = DraftPlanner(4, quadratic=False, prior=[0.5] * 4)
    planner.lookup = auto._Rates([0.9] * 4)
    planner.ratio_samples["ar"] = [1.0]
    # merged k=4 with a 2-token lookup: 1 + .9 + .81 + .405 + .2025 = 3.3175 tokens for 2 s (draft + verify)
    planner._costs[1] = [1.0, 2.0, 2.0, 2.0, 2.0]
    assert planner.choose(_Rows(1), lookup_len=2) == Choice(2, True)  # lookup alone: 2.71 tokens for 1 s is better
    before_l, before_d = list(planner.lookup.attempts), list(planner.diffusion.attempts)
    planner.record([3], drafted=4, lookup_lens=[2])  # lookup tokens 1-2 accepted, diffusion 3 accepted, 4 not
    assert planner.lookup.attempts == [a + 1 for a in before_l[:2]] + before_l[2:]
    assert planner.lookup.accepts[:2] == [1, 1] and planner.lookup.accepts[2:] == [0, 0]
    assert planner.diffusion.attempts == before_d[:2] + [1, 1]
    assert planner.diffusion.accepts == [0, 0, 1, 0]
    planner.record([0], drafted=4, lookup_lens=[2])  # the lookup failed first: the diffusion tail was not reached
    assert planner.diffusion.attempts == [0, 0, 1, 1] and planner.lookup.attempts[:2] == [2, 1]
    planner.record([1], drafted=3, lookup=True, lookup_lens=[1])  # a lookup-only cycle: filler past the lookup
    assert planner.lookup.attempts[:3] == [3, 1, 0] and planner.lookup.accepts[:2] == [2, 1]


def test_lookups_are_priced_by_the_length_of_the_n_gram_they_matched(monkeypatch):
    """A 1-gram match's first token was right 29% of the time on prompts of the embedded default, a 3-gram's 92%:
    priced at the pooled rates, both were taken alike. Each matched length learns its own rates (the pooled ones
    its prior), so the planner verifies a 3-gram lookup and takes an AR step where only a 1-gram matched."""
    import nld_lora.decoding.auto as auto

    monkeypatch.setattr(auto, "forward_seconds", lambda batch, width: 1.0 + 0.1 * width)
    planner = DraftPlanner(4, quadratic=False, prior=[0.05] * 4)  # diffusion drafts never pay
    planner.ratio_samples.update(ar=[1.0], lookup=[1.0])
    for _ in range(30):
        planner.record([0, 3], drafted=3, lookup=True, lookup_lens=[3, 3], lookup_orders=[1, 3])
    assert planner.lookup_by_order[1].accepts[0] == 0 and planner.lookup_by_order[3].accepts[:3] == [30] * 3
    assert planner.lookup.attempts[0] == 60  # the pooled counts take both
    assert planner.choose(_Rows(1), lookup_len=3, lookup_order=3) == Choice(3, True)
    assert planner.choose(_Rows(1), lookup_len=3, lookup_order=1) == Choice(0, False)
    assert planner.lookup_rates(2) == planner.lookup.values()  # a length not seen yet: the pooled rates


def test_a_poor_lookup_gives_way_to_diffusion_drafts_alone(monkeypatch):
    """A merged cycle prices its first positions at the lookup rates: with a poor lookup (a 1-gram match) on offer
    every cycle, diffusion drafts that would have paid were never chosen alone. The planner weighs both and says
    which (Choice.lookup_cut: 0 diffusion alone, None the lookup first)."""
    import nld_lora.decoding.auto as auto

    monkeypatch.setattr(auto, "forward_seconds", lambda batch, width: 1.0)
    planner = DraftPlanner(4, quadratic=False, prior=[0.9] * 4)
    planner.ratio_samples["ar"] = [1.0]
    planner._costs[1] = [1.0, 2.0, 2.0, 2.0, 2.0]
    planner.lookup = auto._Rates([0.05] * 4)  # lookups rarely accepted
    assert planner.choose(_Rows(1), lookup_len=3) == Choice(4, False, 0)
    planner.lookup = auto._Rates([0.95] * 4)  # lookups better than the diffusion drafts: lookup first
    planner.diffusion = auto._Rates([0.9] * 4)
    planner._costs[1] = [1.0, 2.0, 6.0, 6.0, 2.0]  # a 2-token lookup-only verify (half of costs[2]) priced out
    assert planner.choose(_Rows(1), lookup_len=2) == Choice(4, False, None)


def test_diffusion_drafts_alone_with_lookups_on_offer_stay_lossless(monkeypatch):
    """The loop drafts without the lookup tokens when the planner says so, and counts no lookup cycle."""
    import nld_lora.decoding.loops as loops

    class DiffusionAlone(DraftPlanner):
        def choose(self, batch, lookup_len=0, verifying=0, row=None, lookup_order=None):
            super().choose(batch, lookup_len, verifying, row, lookup_order)
            return self._start(1.0, len(batch), Choice(2, False, 0))

    monkeypatch.setattr(loops, "DraftPlanner", DiffusionAlone)
    model = tiny_model(seed=1)
    prompts = random_prompts(3, seed=5)
    ar = model.generate(prompts, mode="ar", max_new_tokens=16, batch_size=3)
    res = model.generate(prompts, mode="self_spec", max_new_tokens=16, batch_size=3, draft_len="auto", ngram=2)
    assert res.sequences == ar.sequences
    assert res.stats.lookup_cycles == 0 and res.stats.forwards["draft"] > 0


@pytest.mark.parametrize("mode", ["self_spec", "self_spec_quadratic"])
def test_auto_draft_len_is_lossless_and_reports_its_choices(mode, tmp_path):
    model = tiny_model(seed=1)
    prompts = random_prompts(6, seed=2)
    ar = model.generate(prompts, mode="ar", max_new_tokens=20, batch_size=3)
    model.attach_adapter(make_adapter(model, tmp_path / "lora"))
    for kw in ({}, {"ngram": 2}):
        res = model.generate(prompts, mode=mode, max_new_tokens=20, batch_size=3, draft_len="auto", **kw)
        assert res.sequences == ar.sequences
        assert res.settings.auto_draft and res.settings.draft_len >= 1
        choices = res.stats.draft_len_choices
        assert sum(choices.values()) > 0 and all(0 <= k <= res.settings.draft_len for k in choices)
    with pytest.raises(ValueError, match="integer or 'auto'"):
        model.generate(prompts, mode=mode, draft_len="longest")


def test_planner_on_a_real_batch_measures_costs_and_picks_a_length():
    """No stubs: the planner times real forwards of this batch (each width once per process) and chooses."""
    from nld_lora.decoding.batch import DecodeBatch
    from nld_lora.decoding.outputs import Outputs

    model = tiny_model(seed=4)
    prompts = random_prompts(3, seed=7)
    batch = DecodeBatch(model, prompts, [0, 1, 2], Outputs(3, 8, model.eos_token_ids).stats, capacity=64)
    batch.prefill()
    lengths = list(batch.lengths)
    planner = DraftPlanner(3, quadratic=False, prior=[0.9, 0.8, 0.7])
    k, lookup, _ = planner.choose(batch)
    assert 0 <= k <= 3 and lookup is False
    assert batch.lengths == lengths  # measuring wrote nothing the batch keeps
    costs = forward_costs(model)
    widths = {key[-1] for key in costs if key[2] == 4}  # 3 rows: the power-of-two bucket of 4
    assert {1, 2, 4} <= widths and all(t > 0 for t in costs.values())
    assert sum(s.total_forwards for s in batch.stats.values()) == 3  # only the prefills were counted


def test_the_next_decode_batch_starts_from_what_the_planner_learnt(tmp_path):
    """Batch-1 runs make one planner per prompt: each must start from the rates the previous one measured (kept
    per adapter and layout), not again from the adapter's evaluated prior; a new adapter set starts afresh."""
    import nld_lora.decoding.auto as auto
    from nld_lora.adapter.twins import planner_memory

    model = tiny_model(seed=1)
    prompts = random_prompts(2, seed=5)
    model.generate(prompts[:1], mode="self_spec", draft_len="auto", max_new_tokens=20, adapter=False)
    learnt = planner_memory(model)[(None, "linear", 1, False)]
    assert any(learnt["ratio_samples"].values())
    model.generate(prompts[:1], mode="self_spec", draft_len="auto", max_new_tokens=20, adapter=False, ngram=2)
    assert planner_memory(model)[(None, "linear", 1, False)] is learnt  # a lookup call learns apart
    assert set(planner_memory(model)) == {(None, "linear", 1, False), (None, "linear", 1, True)}
    planner = DraftPlanner(len(learnt["diffusion"]), False, prior=[0.9] * 3, memory=learnt)
    assert planner.diffusion.prior == pytest.approx([min(max(r, 0.05), 0.95) for r in learnt["diffusion"]])
    assert planner.ratio_samples == learnt["ratio_samples"] and planner.observed == learnt["observed"]
    assert "lookup" not in learnt and planner.lookup.prior == [auto.PRIOR_RATE] * len(learnt["diffusion"])
    assert DraftPlanner(3, False, prior=[0.9] * 3).diffusion.prior == [0.9] * 3
    model.attach_adapter(make_adapter(model, tmp_path / "lora"))
    assert planner_memory(model) == {}


def test_a_choice_that_ran_slower_than_predicted_is_priced_by_its_observed_time():
    import time

    planner = _planner_with_costs([0.9] * 4, [1.0, 1.5, 1.6, 1.7, 1.8])
    assert planner.choose(_Rows(1))[0] == 4
    for _ in range(2):  # two k=4 cycles took 20 s each (the forwards' prediction said 1.8 s)
        planner.choose(_Rows(1))
        planner._started = time.perf_counter() - 20.0
        planner.finish(4)
    assert len(planner.observed.get((1, "draft", 4), [])) == 1  # the second is timed at the next choice
    planner.choose(_Rows(1))
    assert len(planner.observed[(1, "draft", 4)]) == 2
    planner.ratio_samples["draft"] = [1.0]  # as if the other draft lengths ran as predicted
    assert planner.choose(_Rows(1))[0] == 3  # k=4 priced at its observed ~20 s, k=3 at its prediction
    assert planner.remember()["observed"] == planner.observed


def test_a_fresh_planner_times_an_ar_step_before_it_drafts():
    """Until an AR step was timed the planner cannot price drafting against it (the one-off width measurements
    put AR steps at 1/0.56 of their real time in a traced run), so its first choice is an AR step however good the drafts look."""
    planner = DraftPlanner(4, False, prior=[0.95] * 4)
    planner._costs[1] = [1.0, 1.1, 1.1, 1.1, 1.1]
    assert planner.choose(_Rows(1)) == Choice(0, False)
    planner.finish(0)
    planner.ratio_samples["ar"] = [1.0]  # measured as predicted
    assert planner.choose(_Rows(1))[0] == 4


def test_a_cycle_is_timed_until_the_next_choice_so_its_bookkeeping_counts():
    """Work the loop does after a cycle's forwards (committing tokens, drafting state) is part of that cycle's cost:
    stopping the clock at finish() left it out for draft cycles, and single-forward auto drafted below AR speed."""
    import time

    planner = _planner_with_costs([0.5] * 4, [1.0, 1.5, 1.6, 1.7, 1.8])
    k = planner.choose(_Rows(1))[0]
    planner.finish(k)
    time.sleep(0.05)  # bookkeeping after the cycle's tokens reached the host
    assert not planner.observed
    planner.choose(_Rows(1))
    (times,) = planner.observed.values()
    assert len(times) == 1 and times[0] >= 0.05


def _run_cycle(planner, seconds: float, lookup_len: int = 0) -> Choice:
    """One choice whose cycle took `seconds` of wall time (closed by the next choose)."""
    import time

    choice = planner.choose(_Rows(1), lookup_len)
    planner._started = time.perf_counter() - seconds
    planner.finish(choice.k, lookup=choice.lookup)
    return choice


def test_one_slow_ar_step_does_not_set_the_price_of_ar_steps():
    """A one-off spike on the first AR step (seen in a batch-1 trace: AR priced at 2.5x its real time) made the
    planner draft below AR speed for the rest of the run; the median of the last cycles ignores it."""
    planner = DraftPlanner(4, False, prior=[0.5] * 4)
    planner._costs[1] = [1.0, 1.9, 2.0, 2.1, 2.2]
    assert _run_cycle(planner, 3.0) == Choice(0, False)  # the first AR step is timed: a spike, 3x its prediction
    for _ in range(2):
        assert _run_cycle(planner, 1.0)[0] == 0  # then AR steps as predicted
    planner.choose(_Rows(1))
    assert planner.ratio_samples["ar"] == pytest.approx([3.0, 1.0, 1.0], rel=0.01)
    assert planner.time_ratio["ar"] == pytest.approx(1.0, rel=0.01)
    assert planner.remember()["ratio_samples"]["ar"] == planner.ratio_samples["ar"]


def test_the_planner_times_an_ar_step_again_every_few_cycles():
    """Once drafting wins, AR steps would never be timed again and a stale AR price would stay; every AR_REPROBE
    cycles one AR step keeps it current."""
    import nld_lora.decoding.auto as auto

    planner = _planner_with_costs([0.95] * 4, [1.0, 1.1, 1.1, 1.1, 1.1])
    planner.ratio_samples["draft"] = [1.0]
    choices = [_run_cycle(planner, 1.1)[0] for _ in range(auto.AR_REPROBE + 2)]
    assert choices[: auto.AR_REPROBE] == [4] * auto.AR_REPROBE and choices[auto.AR_REPROBE] == 0
    assert choices[auto.AR_REPROBE + 1] == 4


def test_lookup_drafts_on_offer_are_tried_again_after_a_bad_start(monkeypatch):
    """Lookup rates learn only from verified lookups: after an unlucky start a prompt stayed on AR steps though its
    lookups would have paid (a report run: 256 lookup cycles where the same prompts took 632). Lookups on offer but
    not verified for LOOKUP_RETRY cycles run again; once they pay the planner keeps them."""
    import nld_lora.decoding.auto as auto

    monkeypatch.setattr(auto, "forward_seconds", lambda batch, width: 1.0 + 0.1 * width)
    planner = DraftPlanner(4, quadratic=False, prior=[0.05] * 4)
    planner.ratio_samples.update(ar=[1.0], lookup=[1.0])
    for _ in range(60):
        planner.record([0], drafted=3, lookup=True)  # the first lookups failed: AR steps look better
    choices = [_run_cycle(planner, 1.0, lookup_len=3) for _ in range(auto.LOOKUP_RETRY + 1)]
    assert choices[:auto.LOOKUP_RETRY] == [Choice(0)] * auto.LOOKUP_RETRY and choices[-1].lookup
    for _ in range(40):
        planner.record([3], drafted=3, lookup=True)  # the retried lookups are accepted whole
    assert _run_cycle(planner, 1.0, lookup_len=3) == Choice(3, True)
    assert _run_cycle(planner, 1.0) == Choice(0, False)  # no lookup on offer: the retry counter plays no part


def test_ar_choices_in_a_row_run_in_doubling_runs_timed_per_step():
    """Planning every AR step again cost the loop ~2% of a batch-8 AR step (issue #22: auto below AR); a choice of
    AR is a run of AR steps doubling while AR keeps winning, each step timed at its share of the run, and a choice
    to draft starts the doubling again."""
    import time

    import nld_lora.decoding.auto as auto

    planner = _planner_with_costs([0.3] * 4, [1.0, 2.0, 2.2, 2.4, 2.6])  # drafting never pays
    runs = []
    for _ in range(6):
        assert planner.choose(_Rows(1)) == Choice(0, False)
        runs.append(planner.ar_run())
        planner._started = time.perf_counter() - 4.0 * runs[-1]  # each step took 4 s (predicted: 1 s)
        planner.finish(0, steps=runs[-1])
    assert runs == [1, 2, 4, auto.AR_RUN_MAX, auto.AR_RUN_MAX, auto.AR_RUN_MAX]
    planner.choose(_Rows(1))
    assert planner.observed[(1, "ar", 0)][-1] == pytest.approx(4.0, rel=0.01)
    planner.ratio_samples["ar"] = [4.0] * auto.TIME_WINDOW  # AR steps at 4 s a token, draft cycles as predicted:
    planner.ratio_samples["draft"] = [1.0]  # drafting wins now
    planner.observed.clear()
    assert planner.choose(_Rows(1))[0] > 0 and planner.ar_run() == 1


@pytest.mark.parametrize("mode", ["self_spec", "self_spec_quadratic"])
def test_runs_of_ar_steps_stay_lossless_and_note_each_step(mode, monkeypatch):
    """With runs of AR steps (up to AR_RUN_MAX = 32 here), auto decoding still emits AR's tokens, and in linear
    mode each request's AR forwards equal its noted choices of 0 drafts (the run notes every step, not only its
    first)."""
    import nld_lora.decoding.auto as auto

    monkeypatch.setattr(auto, "AR_RUN_MAX", 32)
    model = tiny_model(seed=1)
    prompts = random_prompts(5, seed=4)
    ar = model.generate(prompts, mode="ar", max_new_tokens=24, batch_size=3)
    for kw in ({}, {"ngram": 2}):
        res = model.generate(prompts, mode=mode, max_new_tokens=24, batch_size=3, draft_len="auto", **kw)
        assert res.sequences == ar.sequences
        if mode == "self_spec":
            for request in res.stats.requests:
                assert request.forwards["ar"] == request.draft_len_choices.count(0) > 0


def test_an_ar_run_ended_by_lookups_hands_them_on(monkeypatch):
    """When a run of AR steps stops because every row found a lookup draft, the next cycle weighs those drafts
    without looking them up again: no two lookups in a row see the same committed tokens. Forward costs are set so
    drafting never pays, so AR runs are long and lookups (repeating prompts) end them."""
    import nld_lora.decoding.auto as auto
    import nld_lora.decoding.loops as loops

    monkeypatch.setattr(auto, "AR_RUN_MAX", 32)
    model = tiny_model(seed=1)
    costs = forward_costs(model)
    for width in (1, 2, 4, 8, 16, 32):
        costs[(str(model.device), False, 1, width)] = 1e-4 if width == 1 else 1.0
    seen, original, breaks = [], loops._lookup_drafts, []

    def spy(batch, out, cfg, k):
        seen.append((tuple(batch.rows), tuple(len(out.tokens[rid]) for rid in batch.rows)))
        return original(batch, out, cfg, k)

    def counted_run(*args, **kw):
        seeds, found = original_run(*args, **kw)
        breaks.append(found is not None)
        return seeds, found

    original_run = loops._ar_run
    monkeypatch.setattr(loops, "_lookup_drafts", spy)
    monkeypatch.setattr(loops, "_ar_run", counted_run)
    prompts = [p * 4 for p in random_prompts(3, seed=5)]
    res = model.generate(prompts, mode="self_spec", max_new_tokens=32, batch_size=1, draft_len="auto", ngram=2)
    assert res.sequences == model.generate(prompts, mode="ar", max_new_tokens=32, batch_size=1).sequences
    assert any(breaks)  # some runs did end on found lookups
    assert all(a != b for a, b in zip(seen, seen[1:]))


def test_rows_that_finish_mid_decode_are_priced_from_the_measured_bucket_not_measured(monkeypatch):
    """Measuring forward costs for the smaller rows bucket that finished rows leave (8 forwards per width) inside
    the decode cost a batch-8 auto row 7% of its time; those rows are priced from the bucket measured nearest. A
    width whose next power of two does not fit in the cache is priced from the widths below it, not measured at a
    capped width of its own."""
    import nld_lora.decoding.auto as auto
    from nld_lora.decoding.batch import DecodeBatch
    from nld_lora.decoding.stats import RequestStats

    model = tiny_model(seed=4)
    batch = DecodeBatch(model, [[5, 6, 7], [8, 9]], [0, 1], [RequestStats(), RequestStats()], capacity=40)
    batch.prefill()
    widths, forward = [], batch.forward
    monkeypatch.setattr(batch, "forward", lambda tokens, kind, **kw: widths.append(tokens.shape[1]) or
                        forward(tokens, kind, **kw))
    two_rows = auto.forward_seconds(batch, 8)
    assert widths == [1, 2, 4, 8] * (auto.TIMING_REPEATS + 1)  # the batch's own bucket: measured
    batch.select([0])  # a row finished: bucket 1, never measured in this process
    widths.clear()
    assert auto.forward_seconds(batch, 8) == two_rows and widths == []
    batch.lengths = [30]  # 10 slots left: width 12 has no room for 16 next to it
    assert auto.forward_seconds(batch, 12) == auto.forward_seconds(batch, 8) and widths == []
    fresh = DecodeBatch(model, [[5, 6, 7]], [0], [RequestStats()], capacity=40)  # a batch that starts at one row
    fresh.prefill()
    auto.forward_seconds(fresh, 4)  # measures its own bucket
    assert ("cpu", False, 1, 4) in forward_costs(model)


def test_between_widths_interpolates_measured_widths_and_holds_past_the_widest():
    from nld_lora.decoding.auto import between_widths

    times = {1: 1.0, 2: 1.5, 4: 3.5}
    assert [between_widths(times, w) for w in (1, 2, 3, 4, 9)] == [1.0, 1.5, 2.5, 3.5, 3.5]


def test_forward_widths_are_measured_together_in_rounds(monkeypatch):
    """The first price of a width measures it and every power of two below it in rounds of one forward per width
    (a slow spell then moves them alike); widths already measured are not measured again."""
    import nld_lora.decoding.auto as auto
    from nld_lora.decoding.batch import DecodeBatch
    from nld_lora.decoding.stats import RequestStats

    model = tiny_model(seed=2)
    batch = DecodeBatch(model, [[5, 6, 7]], [0], [RequestStats()], capacity=64)
    batch.prefill()
    widths, forward = [], batch.forward
    monkeypatch.setattr(batch, "forward", lambda tokens, kind, **kw: widths.append(tokens.shape[1]) or
                        forward(tokens, kind, **kw))
    first = auto.forward_seconds(batch, 16)
    assert widths == [1, 2, 4, 8, 16] * (auto.TIMING_REPEATS + 1)
    assert auto.forward_seconds(batch, 16) == first
    widths.clear()
    between = auto.forward_seconds(batch, 3)
    assert widths == []
    costs = forward_costs(model)
    two, four = (costs[("cpu", False, 1, w)] for w in (2, 4))
    assert between == pytest.approx((two + four) / 2)


@pytest.mark.parametrize("mode", ["self_spec", "self_spec_quadratic"])
def test_the_twins_are_built_before_the_planner_times_a_cycle(mode, tmp_path, monkeypatch):
    """A twin built inside the first draft cycle is timed as that cycle (51 ms where 9 were predicted, and the
    planner never drafted again): the runtime builds the ones it will run before the planner starts."""
    import nld_lora.decoding.loops as loops
    from nld_lora.adapter.twins import decode_state

    model = tiny_model(seed=1)
    adapter = model.attach_adapter(make_adapter(model, tmp_path / "lora"))
    seen = []

    class Watched(DraftPlanner):
        def __init__(self, *args, **kwargs):
            state = decode_state(model)
            seen.append((isinstance(state.merged.get(adapter), torch.nn.Module),
                         isinstance(state.gated.get(adapter), torch.nn.Module)))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loops, "DraftPlanner", Watched)
    model.generate(random_prompts(1, seed=3), mode=mode, draft_len="auto", max_new_tokens=8, adapter=adapter)
    assert seen == [(True, mode == "self_spec_quadratic")]


def test_a_draft_price_set_by_one_slow_cycle_is_timed_again():
    """One diffusion cycle that ran 5x its prediction priced drafting out, and with no diffusion cycle after it
    nothing corrected the price: after DRAFT_REPROBE AR steps the best diffusion choice runs once more."""
    import nld_lora.decoding.auto as auto

    planner = _planner_with_costs([0.95] * 4, [1.0, 1.1, 1.1, 1.1, 1.1])
    planner.ratio_samples["draft"] = [5.6]  # the slow first cycle
    choices, steps = [], 0
    while steps < auto.DRAFT_REPROBE + auto.AR_RUN_MAX:
        k = planner.choose(_Rows(1)).k
        runs = planner.ar_run() if k == 0 else 1
        planner._started = time.perf_counter() - (1.0 * runs if k == 0 else 1.1)
        planner.finish(k, steps=runs)
        choices.append(k)
        steps += runs
        if k:
            break
    assert choices[-1] == 4 and steps >= auto.DRAFT_REPROBE and set(choices[:-1]) == {0}
    for _ in range(3):  # drafting timed as predicted again: it wins on its own
        planner.ratio_samples["draft"].append(1.0)
    assert planner.choose(_Rows(1))[0] == 4


def _ar_steps_until_a_draft(planner: DraftPlanner, limit: int) -> tuple[int, bool]:
    """Run the planner's choices (AR steps timed as predicted) for up to `limit` steps: (steps, drafted)."""
    steps = 0
    while steps < limit:
        k = planner.choose(_Rows(1)).k
        if k:
            return steps, True
        runs = min(planner.ar_run(), limit - steps)
        planner._started = time.perf_counter() - 1.0 * runs
        planner.finish(0, steps=runs)
        steps += runs
    planner.choose(_Rows(1))  # closes the last run's clock, as the next cycle would
    return steps, False


def test_the_draft_reprobe_counts_on_across_decode_batches():
    """Decode batches of a few dozen steps each restarted the count, so DRAFT_REPROBE never fired in a run of short
    generations: a planner built from another's memory goes on counting from where that one stopped."""
    import nld_lora.decoding.auto as auto

    first = _planner_with_costs([0.95] * 4, [1.0, 1.1, 1.1, 1.1, 1.1])
    first.ratio_samples["draft"] = [5.6]  # drafting priced out by one slow cycle
    half = auto.DRAFT_REPROBE // 2
    assert _ar_steps_until_a_draft(first, half) == (half, False)
    learnt = first.remember()
    assert learnt["since_draft"] == half
    second = DraftPlanner(4, False, prior=[0.95] * 4, memory=learnt)
    second._costs[1] = [1.0, 1.1, 1.1, 1.1, 1.1]
    steps, drafted = _ar_steps_until_a_draft(second, auto.DRAFT_REPROBE)
    assert drafted and half <= steps <= half + auto.AR_RUN_MAX
    fresh = DraftPlanner(4, False, prior=[0.95] * 4, memory={**learnt, "since_draft": 0})
    fresh._costs[1] = [1.0, 1.1, 1.1, 1.1, 1.1]
    assert _ar_steps_until_a_draft(fresh, half) == (half, False)  # without the carried count: no re-probe yet


def test_re_probes_back_off_while_drafting_keeps_losing():
    """Where drafting never pays (batch 8 on this CPU), a re-probe every DRAFT_REPROBE steps cost some 1.3% of an
    auto row's time: each re-probe after which drafting still loses doubles the gap, up to DRAFT_REPROBE_MAX; once
    drafting wins, the gap is DRAFT_REPROBE again; the gap carries to the next decode batch."""
    import nld_lora.decoding.auto as auto

    planner = _planner_with_costs([0.3] * 4, [1.0, 2.5, 2.6, 2.7, 2.8])
    gaps, steps, last = [], 0, 0
    while len(gaps) < 5:
        choice = planner.choose(_Rows(1))
        runs = 1 if choice.k else planner.ar_run()
        if choice.k:  # a re-probe: its drafts are rejected, its time as predicted
            gaps.append(steps - last)
            last = steps
            planner.record([0], drafted=choice.k)
        planner._started = time.perf_counter() - (planner._costs[1][choice.k] if choice.k else 1.0 * runs)
        planner.finish(choice.k, steps=runs)
        steps += 0 if choice.k else runs
    bounds = [auto.DRAFT_REPROBE * 2 ** i for i in range(4)] + [auto.DRAFT_REPROBE_MAX]
    assert bounds == [128, 256, 512, 1024, 1024]
    assert all(bound <= gap <= bound + auto.AR_RUN_MAX for gap, bound in zip(gaps, bounds)), gaps
    assert planner.remember()["reprobe_gap"] == auto.DRAFT_REPROBE_MAX
    planner.diffusion = auto._Rates([0.95] * 4)  # drafts that pay after the last re-probe
    assert planner.choose(_Rows(1)).k and planner.remember()["reprobe_gap"] == auto.DRAFT_REPROBE
    paying = DraftPlanner(4, False, prior=[0.95] * 4, memory={"reprobe_gap": auto.DRAFT_REPROBE_MAX})
    paying._costs[1] = [1.0, 1.1, 1.1, 1.1, 1.1]
    paying.ratio_samples["ar"] = [1.0]
    assert paying.choose(_Rows(1)).k and paying.remember()["reprobe_gap"] == auto.DRAFT_REPROBE  # no re-probe ran
    carried = DraftPlanner(4, False, prior=[0.3] * 4, memory={"reprobe_gap": 512, "since_draft": 300})
    carried._costs[1] = [1.0, 2.5, 2.6, 2.7, 2.8]
    steps, drafted = _ar_steps_until_a_draft(carried, 600)  # 300 steps counted of the carried 512 (the default
    assert drafted and 512 - 300 <= steps <= 512 - 300 + auto.AR_RUN_MAX  # gap would re-probe at once)


def test_the_draft_reprobe_runs_while_lookups_are_on_offer(monkeypatch):
    """At batch 1 a 1-gram lookup is on offer nearly every cycle, and a lookup choice put the re-probe off every time
    (a report run drafted not once): when it is due, the diffusion cycle (over lookup + diffusion tail) runs."""
    import nld_lora.decoding.auto as auto

    monkeypatch.setattr(auto, "forward_seconds", lambda batch, width: 1.0 + 0.1 * width)
    planner = DraftPlanner(4, quadratic=False, prior=[0.95] * 4)
    planner.ratio_samples.update(ar=[1.0], lookup=[1.0], draft=[5.6])  # drafting priced out by one slow cycle
    for _ in range(40):
        planner.record([3], drafted=3, lookup=True)  # lookups pay
    choices = [_run_cycle(planner, 1.3, lookup_len=3) for _ in range(auto.DRAFT_REPROBE + 1)]
    assert [i for i, c in enumerate(choices) if c.k and not c.lookup] == [auto.DRAFT_REPROBE]
    assert sum(c.lookup for c in choices) > 0.9 * auto.DRAFT_REPROBE
