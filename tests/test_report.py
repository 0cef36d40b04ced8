"""Report metrics on hand-built records, report files that agree with each other, loud lossless failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nld_lora.decoding.settings import DecodeSettings
from nld_lora.decoding.stats import GenerationStats, RequestStats
from nld_lora.report import ReportConfig, build_report
from nld_lora.report.metrics import acceptance_ci, histogram, pooled_acceptance, summarize_run, token_agreement
from nld_lora.report.speed import SPEED_CANDIDATES
from tests.helpers import ROOT, make_adapter, saved_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _req(accepts: list[int], k: int = 3, new_tokens: int | None = None) -> RequestStats:
    r = RequestStats()
    for n in accepts:
        r.record_cycle(0, n, list(range(k)))
    r.forwards["prefill"] = 1
    r.forwards["draft"] = r.forwards["verify"] = len(accepts)
    r.new_tokens = new_tokens if new_tokens is not None else 1 + sum(a + 1 for a in accepts)
    return r


def test_metrics_on_known_cycles():
    a = _req([0, 3, 1])  # acceptance lengths 1, 4, 2
    b = _req([2])  # 3
    assert a.acceptance_lengths == [1, 4, 2] and a.acceptance_length == pytest.approx(7 / 3)
    assert pooled_acceptance([a, b]) == pytest.approx(10 / 4)  # pooled over cycles, not a mean of means
    # position 1: attempted 4 times, accepted 3 (0 failed at j=1); position 2: attempted 3, accepted 2; ...
    stats = GenerationStats([a, b], wall_s=2.0)
    assert stats.per_position_acceptance == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert stats.per_position_attempts == [4, 3, 2]
    never = GenerationStats([_req([0, 0])], wall_s=1.0)  # every cycle fails at position 1
    assert never.per_position_acceptance == [0.0, None, None] and never.per_position_attempts == [2, 0, 0]
    assert histogram([a, b], 4) == [1, 1, 1, 1]
    assert a.tpf == pytest.approx(8 / 7) and stats.tokens_per_s == pytest.approx((8 + 4) / 2.0)
    lo, hi = acceptance_ci([a, b, _req([1, 1]), _req([3])], seed=1)
    assert lo <= pooled_acceptance([a, b, _req([1, 1]), _req([3])]) <= hi
    assert (lo, hi) == acceptance_ci([a, b, _req([1, 1]), _req([3])], seed=1)
    summary = summarize_run(stats, 3, ["x", "y"])
    assert summary["per_category"]["x"]["acceptance_length"] == pytest.approx(7 / 3)
    assert token_agreement([[1, 2, 3]], [[1, 2, 4]]) == {"exact_prompts": 0.0, "token_agreement": pytest.approx(2 / 3)}


def _prompts(path: Path) -> Path:
    cats = ["class_method", "plain_function"]
    rows = [{"id": f"p{i}", "prompt": f"def f{i}(a):\n    return a" + " + a" * i, "category": cats[i % 2]}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_files_exist_parse_and_agree(tmp_path):
    import nld_lora

    model = nld_lora.load(saved_tiny_model(tmp_path / "m"))
    adapter = make_adapter(model, tmp_path / "lora", r=4)
    cfg = ReportConfig(max_new_tokens=12, batch_size=3, speed_prompts=2, decode=DecodeSettings(block_size=4))
    build_report(model, [adapter], _prompts(tmp_path / "p.jsonl"), tmp_path / "rep", cfg, progress=False)
    on_disk = json.loads((tmp_path / "rep" / "report.json").read_text())
    texts = [json.loads(line)["prompt"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    settings = DecodeSettings(block_size=4, draft_len=3)
    model.attach_adapter(adapter, name="check")
    for label, adapter_arg in (("before", False), ("after", "check")):  # the same runs straight through the runtime
        ref = model.generate(texts, mode="self_spec", adapter=adapter_arg, batch_size=3, max_new_tokens=12,
                             settings=settings).stats
        assert on_disk[label]["acceptance_length"] == pytest.approx(ref.acceptance_length)
        assert on_disk[label]["tpf"] == pytest.approx(ref.tpf) and on_disk[label]["cycles"] == len(ref.acceptance_lengths)
        assert on_disk[label]["per_position_acceptance"] == pytest.approx(ref.per_position_acceptance)
    for key in ("acceptance_length", "tpf", "per_position_acceptance", "histogram", "per_category"):
        assert key in on_disk["before"] and key in on_disk["after"]
    assert on_disk["n_prompts"] == 6 and on_disk["lossless"]["mismatches"] == 0
    assert on_disk["ar"]["tpf"] == 1.0 and on_disk["ar"]["tokens_per_s"] > 0
    assert set(on_disk["before"]["per_category"]) == {"class_method", "plain_function"}
    assert sum(on_disk["before"]["histogram"]) == on_disk["before"]["cycles"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"{on_disk['before']['acceptance_length']:.3f}" in md and f"{on_disk['after']['tpf']:.3f}" in md
    assert "**0 mismatching prompts**" in md
    assert f"| r_1 (first draft position accepted) | {on_disk['before']['per_position_acceptance'][0]:.3f} |" in md
    paired = on_disk["first_position_paired"]
    assert set(paired) == {"before", "after"}
    assert paired["before"]["before"] == pytest.approx(on_disk["before"]["per_position_acceptance"][0], abs=0.02)
    assert "| r_1 at the same contexts: " in md and "identical contexts" in md
    fastest = on_disk["after"]["fastest"]
    assert fastest["mode"] in SPEED_CANDIDATES and fastest["mode"] in md and fastest["tokens_per_s_batch1"] > 0
    assert fastest["selection_prompts"] == 2 and not fastest["selected_on_timed_prompts"]
    assert fastest["rounds"] == cfg.speed_rounds and fastest["ar_tokens_per_s_batch1"] > 0
    before_fastest = on_disk["before"]["fastest"]
    faster = fastest["speedup_vs_ar_batch1"] >= before_fastest["speedup_vs_ar_batch1"]
    assert ("fastest lossless mode is faster" if faster else "Measured reason") in md
    assert faster or f"lookup cycles {fastest['lookup_cycles']} against {before_fastest['lookup_cycles']}" in md
    cycle = on_disk["draft_cycle_batch1"]["after"]
    assert cycle is not None and f"{cycle['ms_per_token']:.2f} ms per token ({cycle['draft_len']} drafts" in md
    model.detach_adapter()  # (the fastest mode's own figures depend on measured timings: only its shape is checked)
    for name in on_disk["plots"].values():
        data = (tmp_path / "rep" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and f"]({name})" in md
        import matplotlib.image

        assert matplotlib.image.imread(tmp_path / "rep" / name).shape[0] > 100
    assert model.adapters == {}  # the report leaves the model as it found it
    second = make_adapter(model, tmp_path / "lora2", r=4, seed=5)
    both = build_report(model, [adapter, second], tmp_path / "p.jsonl", tmp_path / "rep2", cfg, progress=False)
    assert {"adapter0", "adapter1"} <= set(both["runs"]) and both["after"] == both["runs"]["adapter0"]
    assert "| j | before | adapter0 | adapter1 |" in (tmp_path / "rep2" / "report.md").read_text()


@pytest.mark.slow
def test_lossless_mismatch_is_loud_with_strict(tmp_path):
    model_dir = saved_tiny_model(tmp_path / "m")
    import nld_lora

    adapter = make_adapter(nld_lora.load(model_dir), tmp_path / "lora", r=8)
    cmd = [sys.executable, "-m", "nld_lora.cli", "report", "--model", model_dir, "--adapter", adapter,
           "--prompts", str(_prompts(tmp_path / "p.jsonl")), "--out", str(tmp_path / "rep"), "--strict",
           "max_new_tokens=10", "decode.block_size=4", "speed_prompts=1", "diffusion=false", "lora_mode=both"]
    res = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "lossless check failed" in res.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["lossless"]["mismatches"] > 0 and report["lossless"]["per_run"]["after"]["prompt_ids"]


def test_fastest_verdict_says_when_the_adapters_drafts_took_no_part():
    """When neither run drafted with diffusion (only AR steps and lookup cycles) the adapter cannot be what made
    its fastest mode slower, and the verdict says so; with diffusion draft forwards in either run (an auto mode's
    drafts, or a fixed-length mode, which records no draft-length choices) it does not."""
    from nld_lora.report.writers import fastest_verdict

    def run(speedup: float, choices: dict, drafts: int) -> dict:
        return {"speedup_vs_ar_batch1": speedup, "tpf": 2.0, "acceptance_length": 2.8, "lookup_cycles": 600,
                "draft_len_choices": choices, "diffusion_drafts": drafts}

    lookup_only = {"before": {"fastest": run(1.30, {"0": 435}, 0)}, "after": {"fastest": run(1.29, {"0": 407}, 0)}}
    assert "Measured reason: neither run chose a diffusion draft" in fastest_verdict(lookup_only)
    drafted = {"before": {"fastest": run(1.30, {"0": 435}, 0)},
               "after": {"fastest": run(1.29, {"0": 300, "3": 50}, 50)}}
    fixed = {"before": {"fastest": run(1.50, {"0": 434}, 0)}, "after": {"fastest": run(1.43, {}, 260)}}
    for case in (drafted, fixed):
        verdict = fastest_verdict(case)
        assert "Measured reason" in verdict and "neither run" not in verdict
    assert "diffusion draft forwards 260 against 0" in fastest_verdict(fixed)
    assert "is faster" in fastest_verdict({"before": drafted["after"], "after": drafted["before"]})
    faster_without_drafts = fastest_verdict({"before": lookup_only["after"], "after": lookup_only["before"]})
    assert "is faster" in faster_without_drafts and "not the adapter's drafts" in faster_without_drafts
    assert "not the adapter's drafts" not in fastest_verdict({"before": drafted["before"],
                                                              "after": {"fastest": run(1.31, {"3": 50}, 50)}})


def test_paired_r1_redrafts_each_runs_own_first_drafts(tmp_path):
    """Drafting again at a run's cycle starts (the context as the prompt) gives that run's own first drafts, with
    and without the adapter: the same-context r_1 compares the drafters where the runs really drafted."""
    import nld_lora
    from nld_lora.report.paired import cycle_contexts, first_draft_hits, paired_change

    model = nld_lora.load(saved_tiny_model(tmp_path / "m"))
    model.attach_adapter(make_adapter(model, tmp_path / "lora", r=4), name="a")
    texts = [json.loads(line)["prompt"] for line in _prompts(tmp_path / "p.jsonl").read_text().splitlines()]
    settings = DecodeSettings(block_size=4, draft_len=3)
    for adapter in (False, "a"):
        res = model.generate(texts, mode="self_spec", adapter=adapter, batch_size=3, max_new_tokens=16,
                             settings=settings)
        contexts = cycle_contexts(res)
        recorded = [d[0] == full[s + 1]
                    for p, seq, req in zip(res.prompt_ids, res.sequences, res.stats.requests)
                    for full in [p + seq] for s, d in zip(req.cycle_starts, req.cycle_drafts) if s + 1 < len(full)]
        assert len(contexts) == len(recorded) > 10
        assert first_draft_hits(model, contexts, adapter, settings, batch_size=4) == recorded
        assert [c[3] for c in contexts] == recorded  # so the report takes each run's own hits from its record
    change = paired_change([True, True, False, False, True], [True, False, True, True, True])
    assert change["before"] == pytest.approx(3 / 5) and change["after"] == pytest.approx(4 / 5)
    assert (change["after_only"], change["before_only"]) == (2, 1)
    lo, hi = change["change_ci95"]
    assert lo < 0.2 < hi


def test_draft_cycle_cost_prices_two_forwards_per_cycle_against_an_ar_step():
    """A linear cycle of k drafts: E(k) tokens for two forwards of width k + 1 (interpolated between measured
    widths, the widest measured one beyond it); positions no cycle reached (None) end the rates."""
    from nld_lora.report.speed import draft_cycle_cost

    forwards = {"1": 1.0, "2": 1.2, "4": 2.0}  # width 3: 1.6 ms
    cost = draft_cycle_cost([0.5, 0.5, None, 0.9], forwards)
    assert cost == {"draft_len": 1, "tokens_per_cycle": 1.5, "ms_per_cycle": 2.4, "ms_per_token": 1.6,
                    "ar_ms_per_token": 1.0}  # k=2: 1.75 tokens for 3.2 ms, 1.83 ms per token
    flat = draft_cycle_cost([0.9] * 6, {"1": 1.0, "8": 1.0})
    assert flat["draft_len"] == 6 and flat["ms_per_token"] == pytest.approx(2 / (1 + sum(0.9 ** j for j in range(1, 7))),
                                                                           abs=1e-3)
    assert draft_cycle_cost([None], forwards) is None
    with pytest.raises(ValueError, match="width 1"):
        draft_cycle_cost([0.5], {"2": 1.0})
