"""The step-wise engine: requests joining a running batch, aborts, mixed settings, each equal to its solo output."""

import pytest

from nld_lora.decoding.engine import Engine
from tests.helpers import make_adapter, random_prompts, tiny_model

MIXED = [  # (mode, decode settings, adapter?) of the requests that share one engine
    ("ar", {}, False),
    ("self_spec", {"draft_len": 3}, False),
    ("self_spec", {"draft_len": 3}, True),
    ("self_spec", {"draft_len": 2, "ngram": 3}, True),
    ("self_spec", {"draft_len": "auto"}, True),
    ("self_spec_quadratic", {"draft_len": 2}, False),
    ("self_spec_quadratic", {"draft_len": 3}, True),
]


def _drain(engine: Engine, joins: dict[int, list] | None = None) -> dict[int, list[int]]:
    """Step to the end; joins[step] lists add_request kwargs to add before that step. Returns rid -> tokens."""
    joins = joins or {}
    step = 0
    streamed: dict[int, list[int]] = {}
    while engine.has_work() or any(s >= step for s in joins):
        for kwargs in joins.get(step, []):
            engine.add_request(**kwargs)
        for piece in engine.step():
            streamed.setdefault(piece.rid, []).extend(piece.new_tokens)
        step += 1
    return streamed


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = tiny_model(seed=2)
    m.attach_adapter(make_adapter(m, tmp_path_factory.mktemp("lora") / "a", seed=3), lora_mode="draft_only")
    return m


def test_requests_joining_mid_decode_get_their_solo_output(model):
    prompts = random_prompts(len(MIXED) * 2, seed=4)
    solo = [model.generate([p], mode="ar", max_new_tokens=20).sequences[0] for p in prompts]
    engine = Engine(model)
    joins: dict[int, list] = {}
    for i, p in enumerate(prompts):
        mode, decode, lora = MIXED[i % len(MIXED)]
        joins.setdefault(i // 3, []).append(dict(prompt=p, mode=mode, max_new_tokens=20 - i % 5,
                                                 adapter=None if lora else False, **decode))
    streamed = _drain(engine, joins)
    for rid in range(len(prompts)):
        done = engine.pop_finished(rid)
        assert done.tokens == solo[rid][:20 - rid % 5], (rid, MIXED[rid % len(MIXED)])
        assert streamed[rid] == done.tokens  # the streamed pieces add up to the output
        assert done.stats.finish_reason in ("eos", "length")
    assert not engine.groups and not engine.out.tokens  # every row and its cache freed


def test_abort_frees_the_row_and_the_others_continue(model):
    prompts = random_prompts(4, seed=5)
    solo = model.generate(prompts, mode="ar", max_new_tokens=24).sequences
    engine = Engine(model)
    rids = [engine.add_request(p, mode="self_spec", max_new_tokens=24, draft_len=2) for p in prompts]
    engine.step()
    before = engine.running
    assert rids[1] in next(iter(engine.groups.values())).batch.rows
    assert engine.abort(rids[1])
    assert engine.running == before - 1
    assert not engine.abort(rids[1])  # already gone
    _drain(engine)
    aborted = engine.pop_finished(rids[1])
    assert aborted.stats.finish_reason == "abort" and aborted.tokens == solo[1][:len(aborted.tokens)]
    for i in (0, 2, 3):
        assert engine.pop_finished(rids[i]).tokens == solo[i]


def test_max_rows_queues_the_rest_in_order(model):
    prompts = random_prompts(5, seed=6)
    solo = model.generate(prompts, mode="ar", max_new_tokens=12).sequences
    engine = Engine(model, max_rows=2)
    for p in prompts:
        engine.add_request(p, mode="self_spec_quadratic", max_new_tokens=12, draft_len=2)
    engine.step()
    assert engine.running <= 2 and len(engine.waiting) == 3
    _drain(engine)
    assert [engine.pop_finished(i).tokens for i in range(5)] == solo


def test_sampled_rows_joining_stay_within_the_sampling_support(model):
    """A sampled request joining a running quadratic batch (filler drafts) decodes without error and emits only
    tokens the AR pathway gives probability at top_k=1, i.e. its greedy tokens."""
    prompts = random_prompts(3, seed=7)
    solo = model.generate(prompts, mode="ar", max_new_tokens=10).sequences
    engine = Engine(model)
    joins = {0: [dict(prompt=prompts[0], mode="self_spec_quadratic", max_new_tokens=10, temperature=0.8, top_k=1,
                      draft_len=2)],
             2: [dict(prompt=p, mode="self_spec_quadratic", max_new_tokens=10, temperature=0.8, top_k=1, draft_len=2)
                 for p in prompts[1:]]}
    _drain(engine, joins)
    assert [engine.pop_finished(i).tokens for i in range(3)] == solo


def test_bad_requests_are_refused_before_queueing(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="mode="):
        engine.add_request([1, 2], mode="fast")
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], mode="ar")
    with pytest.raises(ValueError, match="not loaded"):
        engine.add_request([1, 2], adapter="nope")
    with pytest.raises(ValueError, match="positions"):
        engine.add_request([1, 2], max_new_tokens=10_000)
    assert not engine.has_work()
    with pytest.raises(ValueError, match="max_rows"):
        Engine(model, max_rows=0)
