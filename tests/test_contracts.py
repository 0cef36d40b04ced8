"""The formats that pass between stages and the defects that hid in their seams: adapter names, adapter metadata,
damaged files named, one draft-length rule, the report's adapter handling, LoRA biases and inference mode."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

import nld_lora
from nld_lora.adapter.attach import AdapterError, lora_enabled
from nld_lora.adapter.meta import AdapterMeta, AdapterMetaError
from nld_lora.adapter.twins import lora_token_gate, pathway_encoder
from nld_lora.config_io import ConfigError
from nld_lora.data.collect import CollectError, load_collected
from nld_lora.model.masks import causal_mask, draft_mask
from nld_lora.report import ReportConfig, build_report
from nld_lora.train import TrainConfig
from nld_lora.train.trainer import STATE_FILE, TrainState
from tests.helpers import EMBEDDED, make_adapter, random_prompts, saved_tiny_model, tiny_model

PROMPTS = random_prompts(4, seed=5)


def _zeroed_copy(adapter: str, dest) -> str:
    """The same adapter folder (same name) with every LoRA B matrix zero: it drafts exactly like no adapter."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, dest)
    weights = load_file(str(dest / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(dest / "adapter_model.safetensors"))
    return str(dest)


def test_two_adapters_with_one_folder_name_both_stay_loaded(tmp_path):
    model = tiny_model(seed=4)
    first = make_adapter(model, tmp_path / "a" / "linear_spec_lora", r=8)
    second = _zeroed_copy(first, tmp_path / "b" / "linear_spec_lora")
    name1 = model.attach_adapter(first)
    alone = model.generate(PROMPTS, mode="self_spec", adapter=name1, max_new_tokens=16, draft_len=3)
    name2 = model.attach_adapter(second)
    assert (name1, name2) == ("linear_spec_lora", "linear_spec_lora_2")
    again = model.generate(PROMPTS, mode="self_spec", adapter=name1, max_new_tokens=16, draft_len=3)
    assert again.stats.acceptance_lengths == alone.stats.acceptance_lengths  # not overwritten by the zeroed copy
    base = model.generate(PROMPTS, mode="self_spec", adapter=False, max_new_tokens=16, draft_len=3)
    zero = model.generate(PROMPTS, mode="self_spec", adapter=name2, max_new_tokens=16, draft_len=3)
    assert zero.stats.acceptance_lengths == base.stats.acceptance_lengths
    with pytest.raises(AdapterError, match="named 'linear_spec_lora' is attached already"):
        model.attach_adapter(second, name="linear_spec_lora")


def test_cli_generate_keeps_every_adapter(tmp_path, capsys):
    from nld_lora.cli import main

    folder = saved_tiny_model(tmp_path / "m")
    first = make_adapter(nld_lora.load(folder), tmp_path / "a" / "linear_spec_lora", r=4)
    second = _zeroed_copy(first, tmp_path / "b" / "linear_spec_lora")
    assert main(["generate", "--model", folder, "--prompt", "def f(a):", "--adapter", first, "--adapter", second,
                 "--quiet", "max_new_tokens=4", "decode.draft_len=2"]) == 0
    assert '"mode": "self_spec"' in capsys.readouterr().out
    from nld_lora.cli import attach_adapters

    model = nld_lora.load(folder)  # what the command did with its --adapter flags
    assert attach_adapters(model, [first, second]) == ["linear_spec_lora", "linear_spec_lora_2"]
    assert model.active_adapter == "linear_spec_lora_2" and len(model.adapters) == 2


def test_damaged_adapter_and_stage_files_are_named(tmp_path, collected):
    model = tiny_model(seed=1)
    adapter = tmp_path / "lora"
    make_adapter(model, adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: cannot read .*corrupt or truncated"):
        model.attach_adapter(str(adapter))
    make_adapter(model, adapter)
    for text, error in (('{"draft_len": 3,', r"nld_adapter.json: invalid JSON at line 1"),
                        ('{"draft_len": "three"}', r"nld_adapter.json: field 'draft_len' is 'three'"),
                        ('{"lora_mode": "sometimes"}', r"nld_adapter.json: field 'lora_mode'"),
                        ('{"schema_version": 9}', r"schema_version 9 is newer")):
        (adapter / "nld_adapter.json").write_text(text)
        with pytest.raises(AdapterError, match=error):
            model.attach_adapter(str(adapter))
    assert model.adapters == {}
    damaged = tmp_path / "collected"
    shutil.copytree(collected, damaged)
    (damaged / "nld_collect.json").write_text("{")
    with pytest.raises(CollectError, match=r"nld_collect.json: invalid JSON"):
        load_collected(damaged)
    (damaged / "nld_collect.json").write_text("[]")
    with pytest.raises(CollectError, match=r"nld_collect.json: not a collection record"):
        load_collected(damaged)
    state = tmp_path / STATE_FILE
    state.write_text('{"step": 3, "bogus": 1}')
    with pytest.raises(ConfigError, match=rf"{STATE_FILE}: not a valid trainer state"):
        TrainState.load(state)


def test_adapter_meta_round_trip_and_files_written_before_versioning(tmp_path):
    meta = AdapterMeta(base_model="m", draft_len=5, draft_layout="quadratic", eval={"per_position": [0.8, 0.5]})
    meta.write(tmp_path)
    raw = json.loads((tmp_path / "nld_adapter.json").read_text())
    assert raw["schema_version"] == 1
    assert AdapterMeta.read(tmp_path) == meta and AdapterMeta.read(tmp_path).per_position == [0.8, 0.5]
    del raw["schema_version"]  # what the trainer wrote before the schema was versioned
    (tmp_path / "nld_adapter.json").write_text(json.dumps(raw))
    assert AdapterMeta.read(tmp_path).draft_len == 5
    assert AdapterMeta.read(tmp_path / "none") == AdapterMeta()  # NVIDIA's adapter has no nld_adapter.json
    with pytest.raises(AdapterMetaError, match="unknown field"):
        AdapterMeta.from_dict({"draft_length": 3})


def test_one_draft_length_rule_for_single_forward_training_and_decoding(tmp_path):
    from nld_lora.decoding.settings import QUADRATIC_DRAFT_LEN, DecodeSettings, resolve_draft_len

    model = tiny_model(seed=2, block_size=8)
    quad = AdapterMeta(draft_len=2, draft_layout="quadratic")
    lin = AdapterMeta(draft_len=5, draft_layout="linear")
    assert DecodeSettings().resolved(8, quad, quadratic=True).draft_len == 2  # the adapter's trained length
    assert DecodeSettings().resolved(8, lin, quadratic=True).draft_len == QUADRATIC_DRAFT_LEN  # other layout
    assert DecodeSettings().resolved(8, quad, quadratic=False).draft_len == 7
    assert DecodeSettings().resolved(8, lin, quadratic=False).draft_len == 5
    assert DecodeSettings(draft_len=4).resolved(8, quad, quadratic=True).draft_len == 4
    assert resolve_draft_len(8, None, quadratic=True) == QUADRATIC_DRAFT_LEN
    adapter = make_adapter(model, tmp_path / "quad")
    quad.write(adapter)
    model.attach_adapter(adapter)
    res = model.generate(PROMPTS, mode="self_spec_quadratic", max_new_tokens=8)
    assert res.settings.draft_len == 2


def test_trainer_picks_the_single_forward_default_draft_length(collected, tmp_path):
    from nld_lora.decoding.settings import QUADRATIC_DRAFT_LEN
    from nld_lora.train.trainer import ADAPTER_NAME, setup

    run = setup(EMBEDDED, collected, tmp_path / "run", TrainConfig(draft_layout="quadratic", steps=1,
                                                                   eval_fraction=0.25))
    try:
        assert run.draft_len == QUADRATIC_DRAFT_LEN
    finally:
        run.model.detach_adapter(ADAPTER_NAME)


def test_report_honours_each_adapters_lora_mode_and_always_detaches(tmp_path):
    folder = saved_tiny_model(tmp_path / "m")
    model = nld_lora.load(folder)
    adapter = make_adapter(model, tmp_path / "lora", r=8)
    AdapterMeta(lora_mode="both").write(adapter)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def f{i}(a):\n"}) + "\n" for i in range(3)))
    cfg = ReportConfig(max_new_tokens=6, speed_prompts=1, diffusion=False, fastest_mode=False)
    cfg.decode.block_size = 4
    report = build_report(model, [adapter], prompts, tmp_path / "rep", cfg, progress=False)
    assert report["adapters"][0]["lora_mode"] == "both" and report["settings"]["lora_mode"] is None
    assert model.adapters == {}
    with pytest.raises(AdapterError, match="lora_mode"):
        build_report(model, [adapter], prompts, tmp_path / "rep2", ReportConfig(lora_mode="sometimes"))
    assert model.adapters == {} and not (tmp_path / "rep2").exists()  # refused before attaching or writing
    too_long = ReportConfig(max_new_tokens=10**6, speed_prompts=1, diffusion=False)  # fails inside the first run
    with pytest.raises(ValueError, match="max_new_tokens"):
        build_report(model, [adapter], prompts, tmp_path / "rep3", too_long, progress=False)
    assert model.adapters == {}


@torch.no_grad()
def test_inference_twins_keep_lora_biases(tmp_path):
    model = tiny_model(seed=6, attention_bias=True)
    peft = get_peft_model(__import__("copy").deepcopy(model),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "q_proj"], lora_bias=True,
                                     init_lora_weights=False))
    for name, p in peft.named_parameters():
        if "lora_B" in name and name.endswith("bias"):
            p.normal_(std=0.5)
    peft.save_pretrained(str(tmp_path / "lora"))
    name = model.attach_adapter(str(tmp_path / "lora"))
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    pos = torch.arange(6)[None]
    for mask in (draft_mask(valid, 6), causal_mask(valid, 6)):
        with lora_enabled(model, name, True):
            on = model(ids, attention_mask=mask, position_ids=pos)[0]  # PEFT's own forward, biases included
        with lora_enabled(model, name, False):
            off = model(ids, attention_mask=mask, position_ids=pos)[0]
        merged = model(ids, attention_mask=mask, position_ids=pos, encoder=pathway_encoder(model, name, True))[0]
        torch.testing.assert_close(merged, on, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(merged, off, atol=1e-3)
        for start, expected in ((0, on), (6, off)):
            with lora_token_gate(model, name, start) as twin:
                assert twin is not None  # the gated twin, not PEFT's hooks
                gated = model(ids, attention_mask=mask, position_ids=pos, encoder=twin)[0]
            torch.testing.assert_close(gated, expected, atol=1e-5, rtol=1e-4)


def test_loaded_adapters_stay_in_inference_mode(tmp_path):
    model = tiny_model(seed=3)
    name = model.attach_adapter(make_adapter(model, tmp_path / "lora"))
    with lora_enabled(model, name, True):
        model(torch.tensor([[3, 4, 5]]), attention_mask=causal_mask(torch.ones(1, 3, dtype=torch.bool), 3),
              position_ids=torch.arange(3)[None])
    model.generate(PROMPTS[:2], mode="self_spec", max_new_tokens=6, draft_len=2)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
