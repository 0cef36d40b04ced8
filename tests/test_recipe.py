"""The end-to-end recipe: collect -> train -> report, and a re-run that skips every finished stage."""

import json

import pytest

from nld_lora.config_io import ConfigError, load_config
from nld_lora.recipe import RecipeConfig, run_recipe
from tests.helpers import saved_tiny_model


@pytest.mark.slow
def test_recipe_runs_and_resumes(tmp_path):
    model_dir = saved_tiny_model(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def f{i}(a):\n    return a" + " + a" * i})
                               + "\n" for i in range(12)))
    overrides = [f"model={model_dir}", f"train_prompts={prompts}", f"eval_prompts={prompts}",
                 f"out={tmp_path / 'run'}", "collect.max_new_tokens=16", "train.steps=4", "train.eval_every=2",
                 "train.save_every=2", "train.lora.r=4", "train.lora.alpha=8", "draft_len=3",
                 "train.eval_fraction=0.25", "report.decode.block_size=4", "report.max_new_tokens=8",
                 "report.speed_prompts=1", "report.diffusion=false", "report.fit_prompts=4"]
    cfg = load_config(RecipeConfig, None, overrides)
    report = run_recipe(cfg)
    run = tmp_path / "run"
    assert (run / "train" / "linear_spec_lora" / "adapter_model.safetensors").exists()
    assert report["n_prompts"] == 12 and report["lossless"]["mismatches"] == 0
    assert report["fit"]["n_prompts"] == 4 and "Fit vs transfer" in (run / "report" / "report.md").read_text()
    stamp = (run / "report" / "report.json").stat().st_mtime_ns
    adapter_stamp = (run / "train" / "linear_spec_lora" / "adapter_model.safetensors").stat().st_mtime_ns
    again = run_recipe(load_config(RecipeConfig, None, overrides))
    assert again["before"] == report["before"]
    assert (run / "report" / "report.json").stat().st_mtime_ns == stamp
    assert (run / "train" / "linear_spec_lora" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_stamp


@pytest.mark.slow
def test_recipe_trains_on_a_quantized_base_and_reports_with_the_full_one(tmp_path):
    from nld_lora.model.adapter_meta import AdapterMeta

    model_dir = saved_tiny_model(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def g{i}(x):\n    return x" + " * x" * i})
                               + "\n" for i in range(8)))
    overrides = [f"model={model_dir}", f"train_prompts={prompts}", f"eval_prompts={prompts}",
                 f"out={tmp_path / 'run'}", "collect.max_new_tokens=12", "train.steps=2", "train.eval_every=2",
                 "train.save_every=2", "train.lora.r=4", "train.lora.alpha=8", "draft_len=3",
                 "train.eval_fraction=0.25", "report.decode.block_size=4", "report.max_new_tokens=8",
                 "report.speed_prompts=1", "report.diffusion=false", "report.fastest_mode=false",
                 "train.quantization=4bit"]
    report = run_recipe(load_config(RecipeConfig, None, overrides))
    meta = AdapterMeta.read(tmp_path / "run" / "train" / "linear_spec_lora")
    assert meta.base_quantization == "4bit" and meta.train_config["quantization"] == "4bit"
    assert report["lossless"]["mismatches"] == 0  # verified by the full-precision model


def test_recipe_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): train\.lora\.rank"):
        load_config(RecipeConfig, None, ["train.lora.rank=4"])


def test_union_settings_take_the_first_type_that_fits():
    from nld_lora.cli import GenerateConfig

    assert load_config(GenerateConfig, None, ["decode.draft_len=4"]).decode.draft_len == 4
    assert load_config(GenerateConfig, None, ["decode.draft_len=auto"]).decode.draft_len == "auto"
    with pytest.raises(ConfigError, match=r"max_new_tokens: expected int, got 'many'"):
        load_config(GenerateConfig, None, ["max_new_tokens=many"])


@pytest.mark.parametrize("name", ["tiny_code", "nld_8b"])
def test_shipped_recipe_configs_parse(name):
    from tests.helpers import ROOT

    cfg = load_config(RecipeConfig, ROOT / "recipes" / "configs" / f"{name}.yaml")
    cfg.train.validate()
    assert cfg.collect.fields.group == ("source_file" if name == "tiny_code" else "group")
    assert (cfg.collect.use_chat_template is True) == (name == "nld_8b")  # instruct models get their template
