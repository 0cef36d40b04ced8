"""Single-forward ("quadratic") self-speculation: its block layout, the per-token LoRA gate, losslessness."""

import pytest
import torch
from transformers import DynamicCache

from nld_lora.adapter.attach import lora_enabled
from nld_lora.adapter.twins import decode_state, lora_token_gate
from nld_lora.model.masks import causal_mask, draft_mask, quadratic_offsets, quadratic_pattern
from tests.helpers import make_adapter, tiny_model
from tests.test_decoding import _exact_two_token_dist, _tv, ar_reference_with_early_stops


def _pattern_by_rule(s: int, m: int) -> torch.Tensor:
    """The layout written out token by token from NVIDIA's description (independent of quadratic_pattern)."""
    tokens = [("d", i, 0) for i in range(s)] + [("m", i, t) for i in range(s) for t in range(m)]
    q = len(tokens)
    ref = torch.zeros(q, q, dtype=torch.bool)
    for a, (kind_a, i, _) in enumerate(tokens):
        for b, (kind_b, j, _) in enumerate(tokens):
            if kind_a == "d":
                ref[a, b] = kind_b == "d" and j <= i
            else:
                ref[a, b] = (kind_b == "d" and j <= i) or (kind_b == "m" and j == i)
    return ref


def test_quadratic_layout_matches_the_rule_and_positions():
    for s, m in ((1, 2), (2, 3), (4, 4)):
        assert torch.equal(quadratic_pattern(s, m), _pattern_by_rule(s, m))
    assert quadratic_offsets(2, 3).tolist() == [0, 1, 1, 2, 3, 2, 3, 4]


@torch.no_grad()
def test_one_quadratic_forward_equals_separate_verify_and_draft_forwards(tmp_path):
    """Verify row i == a causal forward over [prefix, d_0..d_i] (adapter off); sub-block i == a draft forward of m
    masks after that cached context (adapter on): one gated forward does both."""
    model = tiny_model(seed=3)
    name = model.attach_adapter(make_adapter(model, tmp_path / "lora", target_modules=("o_proj", "down_proj")))
    prefix, block, s, m = [5, 9, 11, 4, 7], [17, 13, 21, 8], 4, 3  # block: the seed d_0, then drafts d_1..d_3
    mask_id = model.mask_token_id
    n, q = len(prefix), s * (1 + m)
    ids = torch.tensor([prefix + block + [mask_id] * (s * m)])
    mask = torch.zeros(1, 1, n + q, n + q, dtype=torch.bool)
    mask[0, 0, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    mask[0, 0, n:, :n] = True
    mask[0, 0, n:, n:] = quadratic_pattern(s, m)
    positions = torch.cat([torch.arange(n), n + quadratic_offsets(s, m)])[None]
    decode_state(model).twins = False  # first PEFT's own modules with gate hooks (the reference path)
    with lora_token_gate(model, name, n + s) as encoder:
        assert encoder is None
        logits = model(ids, attention_mask=mask, position_ids=positions)[0]
    decode_state(model).twins = True  # then the gated twin
    with lora_token_gate(model, name, n + s) as encoder:
        assert encoder is not None
        twin_logits = model(ids, attention_mask=mask, position_ids=positions, encoder=encoder)[0]
    torch.testing.assert_close(twin_logits, logits, atol=1e-5, rtol=0)
    for i in range(s):
        w = n + i + 1
        cache = DynamicCache(config=model.config)
        with lora_enabled(model, name, False):
            ref = model(torch.tensor([prefix + block[:i + 1]]), attention_mask=causal_mask(torch.ones(1, w,
                        dtype=torch.bool), w), position_ids=torch.arange(w)[None], cache=cache)[0]
        assert torch.allclose(logits[0, n + i], ref[0, -1], atol=1e-5), f"verify row {i}"
        with lora_enabled(model, name, True):
            drafted = model(torch.full((1, m), mask_id), attention_mask=draft_mask(torch.ones(1, w + m,
                            dtype=torch.bool), m), position_ids=torch.arange(w, w + m)[None], cache=cache)[0]
        rows = slice(n + s + i * m, n + s + (i + 1) * m)
        assert torch.allclose(logits[0, rows], drafted[0], atol=1e-5), f"sub-block {i}"
    with lora_enabled(model, name, False):
        plain = model(ids, attention_mask=mask, position_ids=positions)[0]
    assert torch.equal(logits[0, :n + s], plain[0, :n + s])  # gated-off rows are the base model's, bit for bit
    assert torch.equal(twin_logits[0, :n + s], plain[0, :n + s])
    assert not torch.allclose(logits[0, n + s:], plain[0, n + s:])


@pytest.mark.parametrize("batch_size", [1, 5])
def test_greedy_quadratic_equals_ar(batch_size, tmp_path):
    model, prompts, ar = ar_reference_with_early_stops(batch_size)
    for k in (1, 2, 3):
        res = model.generate(prompts, mode="self_spec_quadratic", max_new_tokens=24, draft_len=k,
                             batch_size=batch_size)
        assert res.sequences == ar.sequences, f"draft_len={k}"
        assert res.finish_reasons == ar.finish_reasons
        for st in res.stats.requests:  # the first forward only drafts; every later one verifies a cycle
            first = 0 if st.new_tokens == 1 else 1  # a request whose prefill token was EOS runs none
            assert st.forwards["verify_draft"] == first + len(st.acceptance_lengths)
    model.attach_adapter(make_adapter(model, tmp_path / "lora", target_modules=("o_proj", "up_proj")))
    with_lora = model.generate(prompts, mode="self_spec_quadratic", max_new_tokens=24, draft_len=2,
                               batch_size=batch_size)
    assert with_lora.sequences == ar.sequences
    without = model.generate(prompts, mode="self_spec_quadratic", max_new_tokens=24, draft_len=2,
                             batch_size=batch_size, adapter=False)
    assert [r.cycle_drafts for r in with_lora.stats.requests] != [r.cycle_drafts for r in without.stats.requests]
    looked_up = model.generate([p * 3 for p in prompts], mode="self_spec_quadratic", max_new_tokens=24,
                               draft_len=2, ngram=3, batch_size=batch_size)
    assert looked_up.sequences == model.generate([p * 3 for p in prompts], mode="ar", max_new_tokens=24,
                                                 batch_size=batch_size).sequences
    assert looked_up.stats.lookup_cycles > 0


@pytest.mark.parametrize("adapter", [False, True])
def test_quadratic_counts_one_forward_per_cycle_and_tpf_is_acceptance_per_forward(adapter, tmp_path):
    model = tiny_model(seed=4)
    if adapter:  # cycles then run the gated twin, which shares the backbone's leaf modules
        model.attach_adapter(make_adapter(model, tmp_path / "lora"))
    calls = []
    handle = model.encoder.norm.register_forward_hook(lambda *a: calls.append(1))  # once per backbone forward
    res = model.generate([[5, 6, 7, 8]], mode="self_spec_quadratic", max_new_tokens=13, draft_len=2)
    handle.remove()
    st = res.stats.requests[0]
    assert st.total_forwards == len(calls) == st.forwards["prefill"] + st.forwards["verify_draft"]
    assert st.forwards["draft"] == st.forwards["verify"] == 0
    assert st.new_tokens == 13


@torch.no_grad()
def test_sampled_quadratic_matches_ar_distribution():
    """Same test as the linear mode: TV(empirical, exact AR) over the first two tokens, 4000 samples."""
    model = tiny_model(seed=5, vocab=6)
    model.config.eos_token_id = None
    model.diffusion_head.weight.mul_(0.25)
    prompt = [1, 3, 2, 0]
    probs = _exact_two_token_dist(model, prompt, 1.0)
    for rule in ("rejection", "exact_match"):
        res = model.generate([prompt] * 4000, mode="self_spec_quadratic", temperature=1.0, max_new_tokens=4,
                             draft_len=2, seed=11, acceptance=rule)
        assert sum(len(r.acceptance_lengths) for r in res.stats.requests) > 0
        assert _tv([tuple(s[:2]) for s in res.sequences], probs) < 0.07, rule
