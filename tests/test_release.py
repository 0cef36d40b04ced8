"""NVIDIA's release layout end to end, on a tiny random-weight folder written by scripts/make_nld_fixture.py."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Ministral3ForCausalLM

import nld_lora
from nld_lora.adapter.attach import lora_enabled
from nld_lora.adapter.saving import export_adapter
from nld_lora.config_io import load_config
from nld_lora.data.collect import CollectConfig, cap_thinking
from nld_lora.data.collect import _generate_runtime as runtime_backend
from nld_lora.model import CheckpointError
from nld_lora.model.export import export_ar_view
from nld_lora.model.masks import causal_mask, draft_mask
from nld_lora.model.nld_config import backbone_config_from_dict
from nld_lora.model.release import ADAPTER_SUBFOLDER, HUB_PATTERNS, RELEASE_MODEL_TYPE, release_config
from nld_lora.recipe import RecipeConfig, run_recipe
from tests.helpers import EMBEDDED, ROOT

PROMPTS = [[1, 3, 50, 60, 70, 4], [1, 3, 9, 4], [1, 5, 33, 6, 3, 40, 41, 42, 43, 4]]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "nld-tiny"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_nld_fixture.py"), str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return out


def _copy(release, tmp_path, name="copy"):
    dest = tmp_path / name
    shutil.copytree(release, dest)
    return dest


def _causal_logits(model, ids):
    n = ids.shape[1]
    valid = torch.ones(ids.shape, dtype=torch.bool)
    return model(ids, attention_mask=causal_mask(valid, n), position_ids=torch.arange(n)[None])[0]


def test_fixture_has_the_release_layout(release):
    cfg = json.loads((release / "config.json").read_text())
    assert cfg["model_type"] == RELEASE_MODEL_TYPE and cfg["auto_map"]["AutoModel"].startswith("modeling_nemotron")
    assert cfg["dtype"] == "bfloat16" and cfg["mask_token_id"] == 100 and cfg["dlm_loss_weight"] is None
    index = json.loads((release / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and "diffusion_head.weight" in index["weight_map"]
    adapter_cfg = json.loads((release / ADAPTER_SUBFOLDER / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "CAUSAL_LM" and adapter_cfg["inference_mode"] is True
    with safe_open(str(release / ADAPTER_SUBFOLDER / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.encoder.layers.0.self_attn.o_proj.lora_A.weight" in f.keys()
    assert json.loads((release / "generation_config.json").read_text())["eos_token_id"] == [2, 11]
    assert (release / "chat_template.jinja").exists()


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_loads_in_one_dtype_and_every_mode_runs(release, dtype):
    model = nld_lora.load(str(release), dtype=dtype)
    want = torch.bfloat16 if dtype is None else torch.float32
    assert {p.dtype for p in model.parameters()} == {want}
    assert model.encoder.rotary_emb.inv_freq.dtype == torch.float32  # as transformers keeps it
    assert model.eos_token_ids == {2, 11} and model.mask_token_id == 100
    assert model.tokenizer.chat_template and "[INST]" in model.tokenizer.chat_template
    runs = {mode: model.generate(PROMPTS, mode=mode, max_new_tokens=12, block_size=4)
            for mode in ("ar", "diffusion", "self_spec")}
    for res in runs.values():  # every request runs to its budget or stops on one of the release's EOS ids
        assert all(len(s) == 12 or (s and s[-1] in model.eos_token_ids and len(s) < 12) for s in res.sequences)
    assert runs["ar"].stats.tpf == 1.0 and runs["diffusion"].stats.forwards["denoise"] > 0
    if want == torch.float32:  # bf16 verify blocks and single AR steps may round differently
        assert runs["self_spec"].sequences == runs["ar"].sequences


def test_ar_logits_equal_transformers_ministral3_on_renamed_weights(release):
    model = nld_lora.load(str(release), dtype="float32")
    ref = Ministral3ForCausalLM(backbone_config_from_dict(json.loads((release / "config.json").read_text()), "t"))
    state = {}
    for f in sorted(release.glob("model-*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                name = "lm_head.weight" if k == "diffusion_head.weight" else "model." + k.removeprefix("encoder.")
                state[name] = h.get_tensor(k).float()
    ref.load_state_dict(state, strict=True)
    ref.eval()
    ids = torch.tensor([PROMPTS[2] * 8])  # 80 tokens: past original_max_position_embeddings (64)
    with torch.no_grad():
        torch.testing.assert_close(_causal_logits(model, ids), ref(ids).logits, atol=1e-5, rtol=0)


def test_release_adapter_drafts_only_and_self_spec_stays_lossless(release):
    model = nld_lora.load(str(release), dtype="float32")
    ar = model.generate(PROMPTS, mode="ar", max_new_tokens=24)
    name = model.attach_adapter(ADAPTER_SUBFOLDER)  # found inside the model's own folder
    assert name == ADAPTER_SUBFOLDER
    block = torch.tensor([[7] + [model.mask_token_id] * 3])
    valid = torch.ones(1, 4, dtype=torch.bool)
    pos = torch.arange(4)[None]
    with torch.no_grad():
        plain = model(block, attention_mask=draft_mask(valid, 4), position_ids=pos)[0]
        with lora_enabled(model, name, on=True):
            drafted = model(block, attention_mask=draft_mask(valid, 4), position_ids=pos)[0]
    assert (plain - drafted).abs().max() > 1e-3  # the adapter really changes the draft
    for k in (1, 3, 7):
        spec = model.generate(PROMPTS, mode="self_spec", max_new_tokens=24, draft_len=k, batch_size=2)
        assert spec.sequences == ar.sequences
    model.detach_adapter()
    assert model.generate(PROMPTS, mode="ar", max_new_tokens=24).sequences == ar.sequences


def test_lora_mode_both_applies_the_adapter_to_the_prefill(release):
    model = nld_lora.load(str(release), dtype="float32")
    name = model.attach_adapter(str(release / ADAPTER_SUBFOLDER), lora_mode="both")
    with torch.no_grad():
        off = [_causal_logits(model, torch.tensor([p]))[0, -1].argmax().item() for p in PROMPTS]
        with lora_enabled(model, name, on=True):
            on = [_causal_logits(model, torch.tensor([p]))[0, -1].argmax().item() for p in PROMPTS]
    assert on != off  # the fixture adapter moves at least one first token, so the check below can tell
    first = [s[0] for s in model.generate(PROMPTS, mode="ar", max_new_tokens=1).sequences]
    assert first == on


def test_generation_stops_on_any_eos_id_of_generation_config(release, tmp_path):
    folder = _copy(release, tmp_path)
    model = nld_lora.load(str(folder), dtype="float32")
    seq = model.generate(PROMPTS[:1], mode="ar", max_new_tokens=16).sequences[0]
    stop = seq[5]
    assert stop not in (2, 11)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop]}))
    again = nld_lora.load(str(folder), dtype="float32")
    res = again.generate(PROMPTS[:1], mode="self_spec", max_new_tokens=16)
    assert res.sequences[0] == seq[: seq.index(stop) + 1] and res.finish_reasons == ["eos"]


def test_save_round_trip_keeps_the_release_fields(release, tmp_path):
    src = _copy(release, tmp_path, "src")
    (src / "configuration_nemotron_labs_diffusion.py").write_text("# remote code travels with the folder\n")
    model = nld_lora.load(str(src))
    model.save_pretrained(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    for key in ("model_type", "architectures", "auto_map", "dtype", "mask_token_id", "block_size", "dlm_paradigm",
                "dlm_loss_weight", "ar_loss_weight", "dp_varying_mask_ratio", "rope_parameters", "eos_token_id"):
        assert saved[key] == original[key], key
    assert set(release_config("tiny")) <= set(saved)
    for name in ("generation_config.json", "chat_template.jinja", "configuration_nemotron_labs_diffusion.py"):
        assert (tmp_path / "saved" / name).exists(), name
    again = nld_lora.load(str(tmp_path / "saved"))
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        assert torch.equal(_causal_logits(model, ids), _causal_logits(again, ids))


def test_corrupt_or_truncated_shards_are_named(release, tmp_path):
    folder = _copy(release, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name + ".*(corrupt|truncated)"):
        nld_lora.load(str(folder))
    shard.write_bytes(b"\x00garbage" * 4)
    with pytest.raises(CheckpointError, match=shard.name):
        nld_lora.load(str(folder))
    shard.unlink()
    with pytest.raises(CheckpointError, match="not in the folder"):
        nld_lora.load(str(folder))


def test_ar_view_decodes_like_the_runtime_in_transformers(release, tmp_path):
    model = nld_lora.load(str(release), dtype="float32")
    view = export_ar_view(str(release), tmp_path / "ar_view")
    cfg = json.loads((view / "config.json").read_text())
    assert cfg["architectures"] == ["Ministral3ForCausalLM"] and "auto_map" not in cfg and "mask_token_id" not in cfg
    hf = AutoModelForCausalLM.from_pretrained(str(view), dtype=torch.float32).eval()
    ours = model.generate(PROMPTS, mode="ar", max_new_tokens=20)
    for prompt, seq in zip(PROMPTS, ours.sequences):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                          eos_token_id=sorted(model.eos_token_ids), pad_token_id=0)
        assert out[0, len(prompt):].tolist() == seq


def test_ar_view_is_reused_until_its_source_changes(release, tmp_path):
    src = _copy(release, tmp_path, "src")
    view = export_ar_view(str(src), tmp_path / "ar_view")
    cfg = json.loads((view / "config.json").read_text())
    rope = json.loads((src / "config.json").read_text())["rope_parameters"]
    assert cfg["llama_4_scaling"] == {"beta": rope["llama_4_scaling_beta"],
                                      "original_max_position_embeddings": rope["original_max_position_embeddings"]}
    stamps = {f.name: f.stat().st_mtime_ns for f in view.glob("*.safetensors")}
    export_ar_view(str(src), view)
    assert {f.name: f.stat().st_mtime_ns for f in view.glob("*.safetensors")} == stamps  # reused, not rewritten
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"]["llama_4_scaling_beta"] = 0.2
    (src / "config.json").write_text(json.dumps(config))
    export_ar_view(str(src), view)
    assert json.loads((view / "config.json").read_text())["llama_4_scaling"]["beta"] == 0.2
    assert {f.name: f.stat().st_mtime_ns for f in view.glob("*.safetensors")} != stamps


def test_release_layout_export_of_a_model_not_loaded_from_a_release(tmp_path):
    from nld_lora.cli import main

    assert main(["export", "--model", EMBEDDED, "--release-layout", str(tmp_path / "rel")]) == 0
    cfg = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_labs_diffusion" and cfg["architectures"] == ["NemotronLabsDiffusionModel"]
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel"}
    ours, again = nld_lora.load(EMBEDDED), nld_lora.load(str(tmp_path / "rel"))
    ids = torch.tensor([[5, 9, 33, 2000, 17]])
    with torch.no_grad():
        assert torch.equal(_causal_logits(ours, ids), _causal_logits(again, ids))
    assert again.tokenizer is not None and again.mask_token_id == ours.mask_token_id


def test_saving_with_an_adapter_attached_is_refused_with_the_fix(release, tmp_path):
    model = nld_lora.load(str(release))
    model.attach_adapter("linear_spec_lora")
    with pytest.raises(CheckpointError, match=r"adapters attached \(\['linear_spec_lora'\]\): detach_adapter"):
        model.save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()
    model.detach_adapter()
    model.save_pretrained(str(tmp_path / "saved"))
    assert nld_lora.load(str(tmp_path / "saved")).generate(PROMPTS[:1], mode="ar", max_new_tokens=4).sequences


def test_thinking_cap_forces_the_end_token_then_continues(release, tmp_path):
    model = nld_lora.load(str(release), dtype="float32")
    cfg = CollectConfig(max_new_tokens=20, thinking="cap", max_thinking_tokens=6)
    cfg.validate(model.tokenizer)
    prompts = [list(p) for p in PROMPTS]
    seqs, reasons = runtime_backend(model, prompts, cfg, cfg.max_new_tokens, tmp_path)
    before = [list(s) for s in seqs]
    end_id = model.tokenizer.convert_tokens_to_ids("[/THINK]")
    capped = cap_thinking(model, prompts, seqs, reasons, cfg, runtime_backend, tmp_path)
    assert capped == sum(len(s) > 6 and end_id not in s[:6] for s in before) > 0
    for prompt, old, new in zip(prompts, before, seqs):
        if new != old:
            assert new[:6] == old[:6] and new[6] == end_id and len(new) <= 20
            tail = model.generate([prompt + new[:7]], mode="ar", max_new_tokens=13).sequences[0]
            assert new[7:] == tail
    with pytest.raises(ValueError, match="end_think_token"):
        CollectConfig(max_new_tokens=20, thinking="cap", max_thinking_tokens=6,
                      end_think_token="</nope>").validate(model.tokenizer)


def test_hub_download_keeps_every_file_a_user_needs():
    files = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja", "tekken.json", "generation_config.json",
             "modeling_nemotron_labs_diffusion.py", "linear_spec_lora/adapter_config.json",
             "linear_spec_lora/adapter_model.safetensors"]
    assert sorted(filter_repo_objects(files, allow_patterns=HUB_PATTERNS)) == sorted(files)


@pytest.mark.slow
def test_recipe_end_to_end_on_the_release_layout(release, tmp_path):
    model_dir = _copy(release, tmp_path, "model")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Write function number {i}."}) + "\n"
                               for i in range(10)))
    overrides = [f"model={model_dir}", f"train_prompts={prompts}", f"eval_prompts={prompts}",
                 f"out={tmp_path / 'run'}", "collect.max_new_tokens=12", "collect.use_chat_template=true",
                 "collect.system_prompt=Be brief.", "train.steps=3", "train.eval_every=3", "train.save_every=3",
                 "train.lora.r=4", "train.lora.alpha=8", "train.draft_len=3", "train.eval_fraction=0.3",
                 "train.mixed_precision=no", "report.decode.block_size=4", "report.max_new_tokens=8",
                 "report.speed_prompts=1", "report.diffusion=false"]
    report = run_recipe(load_config(RecipeConfig, None, overrides))
    from nld_lora.data.collect import load_collected

    rows = load_collected(tmp_path / "run" / "collect")
    assert rows[0]["prompt_text"].startswith("<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Write function")
    assert report["prompt_format"]["chat_template_applied"] and report["prompt_format"]["system_prompt"] == "Be brief."
    assert "chat template applied" in (tmp_path / "run" / "report" / "report.md").read_text()
    trained = tmp_path / "run" / "train" / "linear_spec_lora"
    assert json.loads((trained / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    with safe_open(str(trained / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.encoder.layers.0.self_attn.o_proj.lora_A.weight" in f.keys()
    installed = export_adapter(trained, model_dir)
    assert installed == model_dir / ADAPTER_SUBFOLDER
    assert len(list(model_dir.glob(f"{ADAPTER_SUBFOLDER}.previous-*"))) == 1  # the released one kept aside
    model = nld_lora.load(str(model_dir), dtype="float32")
    model.attach_adapter(str(installed))
    ar = model.generate(PROMPTS, mode="ar", max_new_tokens=16)
    assert model.generate(PROMPTS, mode="self_spec", max_new_tokens=16, draft_len=3).sequences == ar.sequences
