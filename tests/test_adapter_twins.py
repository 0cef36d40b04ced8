"""Inference twins of the backbone (adapter/layers.py) and the compiled decode path."""

import logging

import pytest
import torch

from nld_lora.adapter.twins import pathway_encoder
from nld_lora.model.masks import causal_mask, draft_mask
from tests.helpers import make_adapter, pathway_outputs, random_prompts, tiny_model


@torch.no_grad()
def test_twins_reproduce_peft_with_the_adapter_off_and_on(tmp_path):
    model = tiny_model(seed=2)
    keys = set(model.state_dict())
    name = model.attach_adapter(make_adapter(model, tmp_path / "lora", target_modules=("q_proj", "down_proj")))
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    pos = torch.arange(6)[None]
    for mask in (causal_mask(valid, 6), draft_mask(valid, 6)):
        out = pathway_outputs(model, name, ids, mask, pos)
        off, on, base, merged = out["off"], out["on"], out["base"], out["merged"]
        assert torch.equal(base, off)
        assert torch.allclose(merged, on, atol=1e-5) and not torch.allclose(merged, off, atol=1e-3)
    assert pathway_encoder(model, name, True) is pathway_encoder(model, name, True)  # built once
    model.detach_adapter()
    assert set(model.state_dict()) == keys and pathway_encoder(model, None, False) is None


@pytest.mark.slow
def test_compiled_decoding_is_lossless_and_leaves_the_model_eager(tmp_path, monkeypatch):
    """Every backbone a compiled decode runs is compiled, twins built inside the call too (the merged twin of a first
    drafting call ran eager), and all of them are eager again afterwards."""
    import nld_lora.decoding.loops as loops
    from nld_lora.adapter.twins import decode_encoders, decode_state
    from nld_lora.decoding.auto import DraftPlanner

    model = tiny_model(seed=1)
    adapter = model.attach_adapter(make_adapter(model, tmp_path / "lora"))
    prompts = random_prompts(3, seed=4)
    ar = model.generate(prompts, mode="ar", max_new_tokens=12, batch_size=1)
    compiled_twins = []

    class Watched(DraftPlanner):
        def __init__(self, *args, **kwargs):
            state = decode_state(model)
            compiled_twins.append([t._compiled_call_impl is not None for t in (state.merged[adapter],
                                                                                state.gated[adapter])])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loops, "DraftPlanner", Watched)
    res = model.generate(prompts[:1], mode="self_spec_quadratic", max_new_tokens=12, compile=True,
                         draft_len="auto", adapter=adapter)  # builds the merged and the gated twin
    assert compiled_twins == [[True, True]] and res.sequences == ar.sequences[:1]
    limit_hits = _DynamoWarnings()
    logging.getLogger("torch._dynamo.convert_frame").addHandler(limit_hits)
    try:
        for mode in ("ar", "self_spec", "self_spec_quadratic"):
            for batch_size in (1, 3):  # a batch of 1 and of several rows: graphs apart (size-1 specialisation)
                res = model.generate(prompts, mode=mode, max_new_tokens=12, batch_size=batch_size, compile=True,
                                     draft_len=2)
                assert res.sequences == ar.sequences, mode
    finally:
        logging.getLogger("torch._dynamo.convert_frame").removeHandler(limit_hits)
    assert not [m for m in limit_hits.messages if "recompile_limit" in m]  # past it, dynamo ran the rest eager
    assert all(e._compiled_call_impl is None for e in decode_encoders(model))


class _DynamoWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_static_shape_cache_is_lossless(tmp_path):
    """The CUDA-graph layout (attention over the whole capacity, index-tensor writes) gives the same tokens."""
    from nld_lora.decoding.batch import DecodeBatch
    from nld_lora.decoding.loops import run_to_end
    from nld_lora.decoding.outputs import Outputs
    from nld_lora.decoding.settings import DecodeSettings

    model = tiny_model(seed=3)
    prompts = random_prompts(4, seed=9)
    ar = model.generate(prompts, mode="ar", max_new_tokens=16)
    cfg = DecodeSettings(draft_len=3).resolved(model.block_size)
    for mode in ("ar", "self_spec", "self_spec_quadratic"):
        out = Outputs(len(prompts), 16, model.eos_token_ids)
        batch = DecodeBatch(model, prompts, list(range(4)), out.stats, capacity=256, static_shapes=True)
        run_to_end(mode, batch, out, cfg, torch.Generator())
        assert list(out.tokens.values()) == ar.sequences, mode
        assert batch.cache.window == 256
    batch = DecodeBatch(model, prompts, list(range(4)), Outputs(4, 16, model.eos_token_ids).stats, capacity=256,
                        static_shapes=True)
    batch.prefill()
    batch.select([0, 2])  # two rows finished: the storage kept is static too (CUDA graphs write it in place)
    for layer in batch.cache.layers:
        assert layer.keys.shape[0] == 2
        assert getattr(layer.keys, "_dynamo_static_input_type", None) and \
            getattr(layer.values, "_dynamo_static_input_type", None)
    with pytest.raises(ValueError, match="compile="):
        model.generate(prompts, compile="max")
