"""nld-lora eval: every mode on the same records, greedy self-speculation scores exactly AR's, latency and cost
figures from the runtime's token times, clear errors for records no scorer can use."""

import json

import numpy as np
import pytest

import nld_lora
from nld_lora.evaluation.latency import cost_per_million_tokens, percentile, request_latency, summarize_latency
from nld_lora.evaluation.runner import CostSettings, EvalConfig, evaluate, read_eval_records
from nld_lora.evaluation.scorers import ScorerError
from tests.helpers import EMBEDDED, ROOT, make_adapter


def _records(path, n_reference: int = 4):
    rows = [json.loads(line) for line in (ROOT / "data" / "prompts" / "code_eval.jsonl").read_text().splitlines()]
    rows = rows[:n_reference]
    rows.append({"id": "sum", "prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
                 "entry_point": "add"})
    rows.append({"id": "gsm", "prompt": "# Q: 2 + 2 = ?\n# A:", "answer": "4"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_mode_is_scored_and_greedy_self_spec_equals_ar(tmp_path):
    model = nld_lora.load(EMBEDDED)
    name = model.attach_adapter(make_adapter(model, tmp_path / "lora", r=4))
    cfg = EvalConfig(max_new_tokens=16, batch_size=3, latency_prompts=2, bootstrap=200, diffusion_blocks=[4],
                     diffusion_thresholds=[0.9, 0.0])
    cfg.decode.block_size = 8
    result = evaluate(model, _records(tmp_path / "eval.jsonl"), tmp_path / "out", cfg, adapter=name)
    modes = result["modes"]
    assert set(modes) == {"ar", "diffusion b4 t0.9", "diffusion b4 t0", "self_spec", "self_spec+adapter"}
    assert result["scorers"] == ["answer", "execution", "reference"]
    for label in ("self_spec", "self_spec+adapter"):
        assert modes[label]["identical_to_ar"]
        assert {m: a["mean"] for m, a in modes[label]["accuracy"].items()} == \
            {m: a["mean"] for m, a in modes["ar"]["accuracy"].items()}
        assert all(a["delta_vs_ar"] == 0.0 for a in modes[label]["accuracy"].values())
    for m, a in modes["diffusion b4 t0"]["accuracy"].items():  # its delta comes with an interval around it
        assert a["delta_ci95"][0] <= a["delta_vs_ar"] <= a["delta_ci95"][1], m
    # the curve: threshold 0 commits every masked position of a step, 0.9 only the confident ones
    assert modes["diffusion b4 t0"]["tpf"] > modes["diffusion b4 t0.9"]["tpf"]
    for mode in modes.values():
        lat = mode["latency"]
        assert 0 < lat["ttft_ms"]["p50"] <= lat["e2el_ms"]["p50"] and lat["ttft_ms"]["p50"] <= lat["ttft_ms"]["p99"]
        assert mode["cost"]["tokens_per_device_hour_batch1"] == pytest.approx(3600 * mode["tokens_per_s_batch1"])
    assert modes["ar"]["tpf"] == 1.0
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| self_spec | " in md and "ttft_ms" in md
    for name in result["plots"].values():
        assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG") and f"]({name})" in md
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["n_records"] == 6


def test_latency_metrics_from_token_times():
    # a request whose cycles emitted 1, then 3, then 2 tokens at 10, 40 and 60 ms; the call ended at 61 ms
    lat = request_latency([0.010, 0.040, 0.040, 0.040, 0.060, 0.060], 0.061)
    assert lat["ttft_ms"] == pytest.approx(10) and lat["e2el_ms"] == pytest.approx(61)
    assert lat["tpot_ms"] == pytest.approx((60 - 10) / 5) and lat["gaps_ms"] == pytest.approx([30, 20])
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    summary = summarize_latency([lat, request_latency([0.02, 0.03], 0.03)])
    assert summary["itl_ms"]["mean"] == pytest.approx((30 + 20 + 10) / 3)
    assert cost_per_million_tokens(2.5, 1000.0) == pytest.approx(2.5 / 3.6e6 * 1e6)


def test_records_no_scorer_can_use_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "reference": "y"}) + "\n" + json.dumps({"id": "q", "prompt": "z"}))
    with pytest.raises(ScorerError, match=r"bad.jsonl line 2: has none of the scorer fields"):
        read_eval_records(bad)
    bad.write_text('{"reference": "y"}\n')
    with pytest.raises(ScorerError, match=r"bad.jsonl line 1: needs a string 'prompt'"):
        read_eval_records(bad)


def _random_llama(folder):
    """A small random Llama-style causal LM with the embedded model's tokenizer: the 'model served today'."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = nld_lora.load(EMBEDDED).tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def test_the_current_setup_is_measured_the_same_way(tmp_path):
    model = nld_lora.load(EMBEDDED)
    cfg = EvalConfig(max_new_tokens=12, batch_size=3, latency_prompts=3, bootstrap=100, diffusion=False,
                     baseline=_random_llama(tmp_path / "llama"), cost=CostSettings(usd_per_hour=2.0))
    result = evaluate(model, _records(tmp_path / "eval.jsonl", 2), tmp_path / "out", cfg)
    modes = result["modes"]
    assert {"baseline", "baseline+lookup"} <= set(modes) and modes["baseline"]["identical_to_ar"] is None
    base, lookup = modes["baseline"], modes["baseline+lookup"]
    # transformers' prompt lookup is greedy-lossless: the same accuracy as its greedy decoding
    assert {m: a["mean"] for m, a in base["accuracy"].items()} == {m: a["mean"] for m, a in lookup["accuracy"].items()}
    assert base["latency"]["ttft_ms"]["p50"] > 0 and base["latency"]["e2el_ms"]["p99"] >= base["latency"]["ttft_ms"]["p99"]
    assert base["cost"]["usd_per_million_tokens_batch1"] == pytest.approx(
        cost_per_million_tokens(2.0, base["tokens_per_s_batch1"]))
    assert "| baseline | " in (tmp_path / "out" / "eval.md").read_text()


def test_a_baseline_that_is_not_a_causal_lm_is_named(tmp_path):
    from nld_lora.evaluation.baseline import Baseline, BaselineError

    (tmp_path / "nope").mkdir()
    with pytest.raises(BaselineError, match=r"nope: not a model folder"):
        Baseline(tmp_path / "nope")
    (tmp_path / "nope" / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(BaselineError, match=r"nope: not a causal LM transformers can load"):
        Baseline(tmp_path / "nope")


def test_sampled_decoding_reports_the_spread_over_seeds(tmp_path):
    model = nld_lora.load(EMBEDDED)
    cfg = EvalConfig(max_new_tokens=10, batch_size=3, latency_prompts=1, bootstrap=50, diffusion=False,
                     sampling_seeds=3)
    cfg.decode.temperature = 1.0
    result = evaluate(model, _records(tmp_path / "eval.jsonl", 3), tmp_path / "out", cfg)
    for mode in result["modes"].values():
        spread = mode["seed_spread"]["edit_similarity"]
        assert spread["seeds"] == 3 and spread["min"] <= mode["accuracy"]["edit_similarity"]["mean"] <= spread["max"]
        assert mode["identical_to_ar"] is None  # sampled runs: no token-equality check
    assert "Sampled decoding" in (tmp_path / "out" / "eval.md").read_text()
