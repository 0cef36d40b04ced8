"""Runtime: losslessness, reductions between modes, sampled losslessness in distribution, stats, errors."""

import collections

import pytest
import torch

from nld_lora.adapter.attach import AdapterError, lora_enabled
from nld_lora.decoding.api import GenerationResult
from nld_lora.decoding.batch import DecodeBatch
from nld_lora.decoding.interleave import interleaved
from nld_lora.decoding.loops import run_to_end
from nld_lora.decoding.outputs import Outputs
from nld_lora.decoding.settings import DecodeSettings
from nld_lora.decoding.stats import GenerationStats
from nld_lora.model.masks import causal_mask
from tests.helpers import make_adapter, random_prompts, tiny_model


def _set_eos_to_frequent_token(model, prompts):
    """Make EOS a token greedy AR actually emits, so finishing mid-batch is exercised."""
    res = model.generate(prompts, mode="ar", max_new_tokens=12)
    counts = collections.Counter(t for seq in res.sequences for t in seq[3:])
    model.config.eos_token_id = counts.most_common(1)[0][0]


def ar_reference_with_early_stops(batch_size: int):
    """(model, prompts, greedy AR result) where some requests stop on EOS mid-batch and others on the length."""
    model = tiny_model(seed=1)
    prompts = random_prompts(10, seed=batch_size)
    _set_eos_to_frequent_token(model, prompts)
    ar = model.generate(prompts, mode="ar", max_new_tokens=24, batch_size=batch_size)
    assert "eos" in ar.finish_reasons and "length" in ar.finish_reasons
    return model, prompts, ar


@pytest.mark.parametrize("batch_size", [1, 5])
def test_greedy_self_spec_equals_ar(batch_size, tmp_path):
    model, prompts, ar = ar_reference_with_early_stops(batch_size)
    for k in (1, 2, 3, 6):  # 1 .. block_size - 1, and past it
        ss = model.generate(prompts, mode="self_spec", max_new_tokens=24, draft_len=k, batch_size=batch_size)
        assert ss.sequences == ar.sequences, f"draft_len={k}"
        assert ss.finish_reasons == ar.finish_reasons
    model.attach_adapter(make_adapter(model, tmp_path / "lora"), lora_mode="draft_only")
    ss = model.generate(prompts, mode="self_spec", max_new_tokens=24, draft_len=3, batch_size=batch_size)
    assert ss.sequences == ar.sequences


def test_greedy_self_spec_equals_ar_on_embedded_model_with_real_acceptance():
    import nld_lora
    from tests.helpers import EMBEDDED

    model = nld_lora.load(EMBEDDED)
    prompts = ["def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "class Stack:\n    def push(self, item):\n"]
    ar = model.generate(prompts, mode="ar", max_new_tokens=40)
    ss = model.generate(prompts, mode="self_spec", max_new_tokens=40, batch_size=2)
    assert ss.sequences == ar.sequences
    assert ss.stats.acceptance_length > 1.5  # drafts really get accepted, so the accept path is exercised


def test_diffusion_block1_threshold1_is_ar_and_commits_once():
    model = tiny_model(seed=2)
    prompts = random_prompts(6, seed=3)
    ar = model.generate(prompts, mode="ar", max_new_tokens=10)
    d = model.generate(prompts, mode="diffusion", block_size=1, threshold=1.0, max_new_tokens=10)
    assert d.sequences == ar.sequences
    log = []
    out = Outputs(len(prompts), 10, set())
    cfg = DecodeSettings(block_size=4, threshold=0.5, policy="leftmost").resolved(model.block_size)
    batch = DecodeBatch(model, prompts, list(range(len(prompts))), out.stats, capacity=64)
    run_to_end("diffusion", batch, out, cfg, torch.Generator(), commit_log=log)
    for commits in log:
        assert torch.equal(commits[:, 1:], torch.ones_like(commits[:, 1:])) and bool((commits[:, 0] == 0).all())
    capped = model.generate(prompts, mode="diffusion", block_size=4, threshold=1.01, max_steps=1, max_new_tokens=8)
    assert all(r.forwards["denoise"] == r.forwards["commit"] for r in capped.stats.requests)


def _exact_two_token_dist(model, prompt, temp):
    probs = {}
    ids = torch.tensor([prompt])
    n = len(prompt)

    def dist(x):
        valid = torch.ones(1, x.shape[1], dtype=torch.bool)
        logits, _ = model(x, attention_mask=causal_mask(valid, x.shape[1]), position_ids=torch.arange(x.shape[1])[None])
        return (logits[0, -1] / temp).softmax(-1)

    p1 = dist(ids)
    vocab = model.config.vocab_size
    for a in range(vocab):
        p2 = dist(torch.cat([ids, torch.tensor([[a]])], 1))
        for b in range(vocab):
            probs[(a, b)] = float(p1[a] * p2[b])
    assert n > 0
    return probs


def _tv(samples, probs):
    counts = collections.Counter(samples)
    total = len(samples)
    return 0.5 * sum(abs(counts.get(key, 0) / total - p) for key, p in probs.items())


@torch.no_grad()
def test_sampled_self_spec_matches_ar_distribution():
    """TV(empirical, exact AR) over the first two tokens; 4000 samples, 36 cells: E[TV] < 0.04, bound 0.07."""
    model = tiny_model(seed=5, vocab=6)
    model.config.eos_token_id = None
    with torch.no_grad():
        model.diffusion_head.weight.mul_(0.25)
    prompt = [1, 3, 2, 0]
    temp = 1.0
    probs = _exact_two_token_dist(model, prompt, temp)
    n = 4000
    bound = 0.07
    for rule in ("rejection", "exact_match"):
        res = model.generate([prompt] * n, mode="self_spec", temperature=temp, max_new_tokens=3, draft_len=2,
                             seed=11, acceptance=rule)
        assert _tv([tuple(s[:2]) for s in res.sequences], probs) < bound, rule
    ar = model.generate([prompt] * n, mode="ar", temperature=temp, max_new_tokens=2, seed=12)
    assert _tv([tuple(s[:2]) for s in ar.sequences], probs) < bound
    # power check: the draft pathway's own samples are measurably off the AR distribution
    drafts = model.generate([prompt] * n, mode="diffusion", temperature=temp, block_size=2, threshold=0.0,
                            max_new_tokens=2, seed=13)
    assert _tv([tuple(s[:2]) for s in drafts.sequences], probs) > bound


def test_ar_sampling_is_seeded():
    model = tiny_model(seed=3)
    prompts = random_prompts(3, seed=9)
    a = model.generate(prompts, mode="ar", temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=8, seed=4)
    b = model.generate(prompts, mode="ar", temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=8, seed=4)
    c = model.generate(prompts, mode="ar", temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=8, seed=5)
    assert a.sequences == b.sequences != c.sequences


@pytest.mark.parametrize("mode,kw,adapter", [("ar", {}, False), ("self_spec", {"draft_len": 3}, False),
                                             ("self_spec", {"draft_len": 3}, True),
                                             ("diffusion", {"block_size": 4, "threshold": 0.5}, False)])
def test_forward_counts_match_hooked_model_calls(mode, kw, adapter, tmp_path):
    model = tiny_model(seed=4)
    if adapter:  # forwards then run the inference twins, which share the backbone's leaf modules
        model.attach_adapter(make_adapter(model, tmp_path / "lora"))
    calls = []
    handle = model.encoder.norm.register_forward_hook(lambda *a: calls.append(1))  # once per backbone forward
    res = model.generate([[5, 6, 7, 8]], mode=mode, max_new_tokens=13, **kw)
    handle.remove()
    assert sum(res.stats.forwards.values()) == len(calls)
    st = res.stats.requests[0]
    assert st.new_tokens == len(res.sequences[0]) == 13
    if mode == "ar":
        assert res.stats.tpf == 1.0
    if mode == "self_spec":
        assert st.forwards["draft"] == st.forwards["verify"] == len(st.acceptance_lengths)
        assert st.total_forwards == 1 + 2 * len(st.acceptance_lengths)
        assert res.stats.tokens_per_s > 0


def test_several_adapters_selected_per_call(tmp_path):
    model = tiny_model(seed=6)
    path_a, path_b = make_adapter(model, tmp_path / "a", seed=1), make_adapter(model, tmp_path / "b", seed=2)
    a = model.attach_adapter(path_a, name="a")
    b = model.attach_adapter(path_b, name="b")
    ids = torch.tensor([[3, 4, 5, 6]])
    valid = torch.ones(1, 4, dtype=torch.bool)

    def logits(name, on):
        with lora_enabled(model, name, on=on):
            return model(ids, attention_mask=causal_mask(valid, 4), position_ids=torch.arange(4)[None])[0]

    base, la, lb = logits("a", False), logits(a, True), logits(b, True)
    assert not torch.allclose(base, la) and not torch.allclose(la, lb)
    assert torch.equal(logits("b", False), base)
    model.detach_adapter("a")
    assert model.adapters.keys() == {"b"}
    model.detach_adapter()
    assert not model.adapters
    with pytest.raises(ValueError, match="not loaded"):
        model.generate([[1, 2]], mode="self_spec", adapter="a", max_new_tokens=2)


def test_errors_are_clear(tmp_path):
    from transformers import Ministral3Config

    from nld_lora.model import new_model
    from tests.helpers import tiny_rope

    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        model.generate([list(range(1, 90)) * 3], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        model.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"draft_len must be in \[1, 256\)"):
        model.generate([[1, 2]], mode="self_spec", draft_len=256, max_new_tokens=2)
    model.attach_adapter(make_adapter(tiny_model(seed=9), tmp_path / "ok"), name="ok")  # same shapes attach
    model.detach_adapter()
    wide = new_model(Ministral3Config(
        rope_parameters=tiny_rope(), vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256, mask_token_id=96))
    mismatched = make_adapter(wide, tmp_path / "wide")
    with pytest.raises(AdapterError, match=r"encoder.layers.0.self_attn.o_proj: lora_B expects out_features 48"):
        model.attach_adapter(mismatched)


def test_generate_cli_prints_stats(tmp_path, capsys):
    from nld_lora.cli import main
    from tests.helpers import saved_tiny_model

    model_dir = saved_tiny_model(tmp_path / "m")
    assert main(["generate", "--model", model_dir, "--prompt", "def f(a):\\n", "--mode", "self_spec",
                 "decode.block_size=4", "max_new_tokens=6"]) == 0
    out = capsys.readouterr().out
    stats = __import__("json").loads(out[out.index('{\n  "mode"'):])
    assert stats["new_tokens"] == 6 and stats["forwards"]["verify"] >= 1 and "--- self_spec ---" in out
    assert main(["generate", "--model", model_dir, "--prompt", "x", "max_new_tokens=0"]) == 2
    assert "max_new_tokens: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--prompt", "x", "decode.draft=3"]) == 2
    assert "unknown config key(s): decode.draft" in capsys.readouterr().err


def test_self_spec_through_the_triton_verify_kernels():
    """The runtime's verify step runs the Triton kernels (interpreted on CPU) and stays lossless."""
    from nld_lora.kernels import set_backend

    model = tiny_model(seed=7)
    prompts = random_prompts(3, seed=4)
    ar = model.generate(prompts, mode="ar", max_new_tokens=10)
    set_backend("triton")
    try:
        ss = model.generate(prompts, mode="self_spec", draft_len=3, max_new_tokens=10, batch_size=3)
        sampled = model.generate(prompts, mode="self_spec", draft_len=3, max_new_tokens=10, temperature=1.0, seed=3)
    finally:
        set_backend("auto")
    assert ss.sequences == ar.sequences
    ref = model.generate(prompts, mode="self_spec", draft_len=3, max_new_tokens=10, temperature=1.0, seed=3)
    assert sampled.sequences == ref.sequences  # counter-based RNG: Triton replays the reference exactly


def test_profile_splits_wall_time_into_forwards_and_overhead():
    model = tiny_model(seed=4)
    res = model.generate(random_prompts(3, seed=5), mode="self_spec", max_new_tokens=8, profile=True)
    st = res.stats
    assert 0 < st.forward_s <= st.wall_s and 0 <= st.overhead_share < 1
    assert model.generate(random_prompts(1), mode="ar", max_new_tokens=2).stats.overhead_share is None


def _ngram_draft_by_scan(context: list[int], max_ngram: int, k: int) -> list[int]:
    """Reference: scan the context backwards for the longest suffix n-gram's latest earlier match."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == context[-n:]:
                return context[start + n:start + n + k]
    return []


def test_ngram_index_takes_the_longest_latest_match_as_a_scan_does():
    from nld_lora.decoding.lookup import NgramIndex

    assert NgramIndex([5, 1, 2, 3, 9, 7, 1, 2], max_ngram=3).draft(3) == [3, 9, 7]
    assert NgramIndex([1, 2, 4, 0, 2, 5, 1, 2], max_ngram=2).draft(2) == [4, 0]  # the 2-gram beats the later 1-gram
    assert NgramIndex([4, 5, 6], max_ngram=3).draft(2) == []
    assert NgramIndex([5, 1, 2, 3, 9, 7, 1, 2], max_ngram=3).match(3) == (2, [3, 9, 7])  # (7, 1, 2) never came before
    assert NgramIndex([1, 2, 4, 2], max_ngram=3).match(2) == (1, [4, 2])
    assert NgramIndex([4, 5, 6], max_ngram=3).match(2) == (0, [])
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        tokens = torch.randint(0, 4 + trial % 5, (int(torch.randint(1, 60, (1,), generator=gen)),),
                               generator=gen).tolist()
        index = NgramIndex(tokens[:len(tokens) // 2], max_ngram=3)
        index.extend(tokens[len(tokens) // 2:])  # grown in two steps, as decoding does
        assert index.draft(4) == _ngram_draft_by_scan(tokens, 3, 4), tokens


@pytest.mark.parametrize("k", [1, 4])
def test_prompt_lookup_self_spec_stays_lossless_and_skips_draft_forwards(k):
    model = tiny_model(seed=6)
    prompts = [p * 3 for p in random_prompts(4, seed=7)]  # repeated text: lookups match
    ar = model.generate(prompts, mode="ar", max_new_tokens=24)
    for bs in (1, 4):
        res = model.generate(prompts, mode="self_spec", max_new_tokens=24, draft_len=k, ngram=3, batch_size=bs)
        assert res.sequences == ar.sequences
        st = res.stats
        assert st.lookup_cycles > 0
        if bs == 1:
            assert st.forwards["draft"] < st.forwards["verify"]  # matched cycles need no draft forward
    with pytest.raises(ValueError, match="ngram must be >= 0"):
        model.generate(prompts, mode="self_spec", ngram=-1)


def test_adapter_folder_names_with_dots_attach(tmp_path):
    model = tiny_model()
    name = model.attach_adapter(make_adapter(model, tmp_path / "lora.v2"))
    assert name == "lora_v2" and model.adapters.keys() == {"lora_v2"}
    with pytest.raises(AdapterError, match="cannot contain"):
        model.attach_adapter(str(tmp_path / "lora.v2"), name="a.b")


def test_diffusion_drafts_past_a_lookup_match_see_its_tokens(monkeypatch):
    """At batch > 1 some rows find a lookup and some do not: the draft block of a row with a lookup carries the
    lookup tokens after its seed (the masks draft past the match), the others stay [seed, mask...]; lossless."""
    from nld_lora.decoding.batch import DecodeBatch
    from nld_lora.decoding.lookup import NgramIndex

    model = tiny_model(seed=6)
    prompts = [p * 3 if i % 2 else p for i, p in enumerate(random_prompts(4, seed=7))]
    ar = model.generate(prompts, mode="ar", max_new_tokens=24)
    blocks, forward = [], DecodeBatch.forward

    def spy(self, tokens, kind, *args, **kw):
        if kind == "draft":
            contexts = [list(self.ngram_index[rid].tokens) for rid in self.rows]  # prompt + committed tokens
            blocks.append((tokens.clone(), [NgramIndex(c, 3).draft(tokens.shape[1] - 1) for c in contexts]))
        return forward(self, tokens, kind, *args, **kw)

    monkeypatch.setattr(DecodeBatch, "forward", spy)
    res = model.generate(prompts, mode="self_spec", max_new_tokens=24, draft_len=4, ngram=3, batch_size=4)
    assert res.sequences == ar.sequences
    with_lookup = 0
    for tokens, lookups in blocks:
        for row, found in zip(tokens.tolist(), lookups):
            assert row[1:1 + len(found)] == found and set(row[1 + len(found):]) <= {model.mask_token_id}
            with_lookup += bool(found)
    assert with_lookup > 0


def test_interleaved_rounds_run_every_row_on_a_batch_before_the_next_and_rotate_who_starts():
    log = []
    runners = {label: (lambda chunk, label=label: log.append((label, tuple(chunk))) or (label, chunk))
               for label in ("ar", "a", "b")}
    results = interleaved(list(range(7)), runners, batch_size=3)
    batches = [(0, 1, 2), (3, 4, 5), (6,)]
    assert [chunk for _, chunk in log] == [b for b in batches for _ in range(3)]
    assert [label for label, _ in log[::3]] == ["ar", "a", "b"]  # a different row starts each batch
    assert {label: [chunk for _, chunk in res] for label, res in results.items()} == {
        label: [list(b) for b in batches] for label in runners}
    log.clear()
    interleaved(list(range(7)), runners, batch_size=3, start=3)  # the next round continues the rotation
    assert [label for label, _ in log[::3]] == ["ar", "a", "b"]
    log.clear()
    interleaved(list(range(4)), runners, batch_size=2, start=2)
    assert [label for label, _ in log[::3]] == ["b", "ar"]
    with pytest.raises(ValueError, match="batch_size"):
        interleaved([1], runners, batch_size=0)


def test_stats_of_batch_by_batch_generate_calls_concat_to_one_calls():
    model = tiny_model(seed=2)
    prompts = random_prompts(5, seed=3)
    whole = model.generate(prompts, mode="self_spec", max_new_tokens=12, draft_len=3, batch_size=2, profile=True)
    parts = interleaved(prompts, {"ss": lambda chunk: model.generate(chunk, mode="self_spec", max_new_tokens=12,
                                                                     draft_len=3, batch_size=2, profile=True)},
                        batch_size=2)["ss"]
    joined = GenerationStats.concat([p.stats for p in parts])
    assert [s for p in parts for s in p.sequences] == whole.sequences
    assert (joined.new_tokens, joined.forwards, joined.acceptance_lengths) == (
        whole.stats.new_tokens, whole.stats.forwards, whole.stats.acceptance_lengths)
    assert joined.wall_s == pytest.approx(sum(p.stats.wall_s for p in parts))
    assert joined.forward_s == pytest.approx(sum(p.stats.forward_s for p in parts))
    assert GenerationStats.concat([parts[0].stats, GenerationStats([], 1.0)]).forward_s is None
    result = GenerationResult.concat(parts)
    assert (result.sequences, result.prompt_ids, result.texts) == (whole.sequences, whole.prompt_ids, whole.texts)
    assert result.stats.new_tokens == whole.stats.new_tokens and result.settings == whole.settings
    with pytest.raises(ValueError, match="at least one"):
        GenerationResult.concat([])
