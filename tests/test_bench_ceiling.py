"""scripts/bench_ceiling.py: its cached draft forwards are the runtime's drafts, and its oracle is the cheapest path."""

import itertools
import random

import torch

from nld_lora.decoding.settings import DecodeSettings
from nld_lora.report.paired import first_cycle_drafts
from tests.helpers import load_script, make_adapter, random_prompts, tiny_model


def _answered(tmp_path, prompt_seed: int, max_new_tokens: int):
    """A tiny model with an adapter attached, and its AR answers to three random prompts: (model, answers, prompt +
    answer token lists, prompt lengths)."""
    model = tiny_model(seed=3)
    model.attach_adapter(make_adapter(model, tmp_path / "lora", target_modules=("q_proj", "o_proj")))
    prompts = random_prompts(3, seed=prompt_seed)
    answers = model.generate(prompts, mode="ar", max_new_tokens=max_new_tokens, adapter=False).sequences
    return model, answers, [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts]


def test_cached_draft_forwards_equal_generates_first_cycle_at_every_context(tmp_path):
    """One prefill per answer and draft forwards from the last position back give, at every context and draft
    length, the drafts generate() makes on that context as the prompt, with and without an adapter."""
    ceiling = load_script("bench_ceiling")
    model, answers, full, starts = _answered(tmp_path, prompt_seed=4, max_new_tokens=9)
    where = [(i, s) for i, a in enumerate(answers) for s in range(len(a) - 1)]
    drafted = {}
    for adapter in (False, model.active_adapter):
        with torch.no_grad():
            cached = ceiling.diffusion_drafts(model, full, starts, adapter or None, [1, 3])
        for k in (1, 3):
            reference = first_cycle_drafts(model, [full[i][:starts[i] + s] for i, s in where],
                                           [answers[i][s] for i, s in where], adapter, DecodeSettings(draft_len=k),
                                           batch_size=4)
            assert [cached[(0, k)][c] for c in where] == reference
        drafted[adapter] = [cached[(0, 3)][c] for c in where]
    assert drafted[False] != drafted[model.active_adapter]  # the adapter changes drafts: both pathways were run


def test_merged_drafts_equal_a_draft_forward_on_each_context_alone(tmp_path):
    """Drafts led by lookup tokens, from the cached forwards, equal the runtime's draft forward of the same block on
    a fresh batch holding that context only; contexts whose lookup is shorter than the cut have none."""
    from nld_lora.decoding.batch import DecodeBatch
    from nld_lora.decoding.sampling import select_tokens
    from nld_lora.decoding.stats import RequestStats

    ceiling = load_script("bench_ceiling")
    model, answers, full, starts = _answered(tmp_path, prompt_seed=5, max_new_tokens=8)
    rng = random.Random(1)
    leads = {(i, s): [rng.randrange(3, 60) for _ in range(rng.randint(0, 3))]
             for i, a in enumerate(answers) for s in range(len(a) - 1)}
    with torch.no_grad():
        cached = ceiling.diffusion_drafts(model, full, starts, model.active_adapter, [2, 4], leads, [1, 2])
        for (c, k), drafted in cached.items():
            assert set(drafted) == {key for key, lead in leads.items() if len(lead) >= c}
            for (i, s), drafts in drafted.items():
                context = full[i][:starts[i] + s]
                alone = DecodeBatch(model, [context], [0], [RequestStats()], capacity=len(context) + k + 2,
                                    adapter=model.active_adapter)
                alone.build_twins(quadratic=False)
                alone.prefill()
                block = torch.tensor([[full[i][starts[i] + s], *leads[(i, s)][:c]] + [model.mask_token_id] * (k - c)])
                predicted = select_tokens(alone.forward(block, "draft", logits_index=slice(1, None)), 0.0, None)
                assert drafts == leads[(i, s)][:c] + predicted[0].tolist()[c:], (c, k, i, s)
    assert {(0, 2), (0, 4), (1, 2), (1, 4), (2, 4)} == set(cached)


def test_the_oracle_finds_the_cheapest_sequence_of_cycles():
    """Against every sequence of cycles, enumerated, on random small instances."""
    ceiling = load_script("bench_ceiling")
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 7)
        options = [[("ar", 0, 1, 1.0)] + [("draft", j, rng.randint(1, 4), rng.uniform(0.5, 3.0))
                                          for j in range(rng.randint(0, 3))] for _ in range(n - 1)]
        best = float("inf")
        for picks in itertools.product(*[range(len(o)) for o in options]):  # a choice at every position; a path
            at, cost = 0, 0.0  # uses those of the positions it stands on
            while at < n - 1:
                option = options[at][picks[at]]
                at, cost = min(at + option[2], n - 1), cost + option[3]
            best = min(best, cost)
        seconds, kinds = ceiling.cheapest(n, options)
        assert abs(seconds - best) < 1e-9 and sum(kinds.values()) >= 1
