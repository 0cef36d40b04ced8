"""The end-to-end recipe: collect -> train -> report, and a re-run that skips every finished stage."""

import json

import pytest

from nld_lora.config_io import ConfigError, load_config
from nld_lora.recipe import RecipeConfig, inherit_prompt_format, run_recipe
from tests.helpers import ROOT, saved_tiny_model


def _tiny_recipe(tmp_path, *extra: str) -> list[str]:
    """Overrides for a seconds-long recipe on a saved tiny model and 12 generated prompts."""
    model_dir = saved_tiny_model(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def f{i}(a):\n    return a" + " + a" * i,
                                           "reference": " + a\n"}) + "\n" for i in range(12)))
    return [f"model={model_dir}", f"train_prompts={prompts}", f"eval_prompts={prompts}", f"out={tmp_path / 'run'}",
            "collect.max_new_tokens=16", "train.steps=4", "train.eval_every=2", "train.save_every=2",
            "train.lora.r=4", "train.lora.alpha=8", "train.draft_len=3", "train.eval_fraction=0.25",
            "report.decode.block_size=4", "report.max_new_tokens=8", "report.speed_prompts=1",
            "report.diffusion=false", "eval.limit=3", "eval.max_new_tokens=6", "eval.latency_prompts=1",
            "eval.diffusion_blocks=[4]", "eval.diffusion_thresholds=[0.0]", "eval.bootstrap=50", *extra]


def _stamps(run) -> tuple:
    """(collected shards and their times, adapter weights' time, report's time, eval's time)."""
    shards = tuple((f.name, f.stat().st_mtime_ns) for f in sorted((run / "collect" / "data").glob("*.parquet")))
    files = (run / "train" / "linear_spec_lora" / "adapter_model.safetensors", run / "report" / "report.json",
             run / "eval" / "eval.json")
    return (shards, *(f.stat().st_mtime_ns for f in files))


@pytest.mark.slow
def test_recipe_reruns_exactly_the_stages_whose_settings_changed(tmp_path):
    overrides = _tiny_recipe(tmp_path, "report.fit_prompts=4")
    report = run_recipe(load_config(RecipeConfig, None, overrides))
    run = tmp_path / "run"
    assert report["n_prompts"] == 12 and report["lossless"]["mismatches"] == 0
    assert report["fit"]["n_prompts"] == 4 and "Fit vs transfer" in (run / "report" / "report.md").read_text()
    evaluated = json.loads((run / "eval" / "eval.json").read_text())
    assert evaluated["modes"]["self_spec+adapter"]["identical_to_ar"] and "diffusion b4 t0" in evaluated["modes"]
    report_md = (run / "report" / "report.md").read_text()
    assert report_md.count("## Accuracy, latency and cost per mode") == 1 and "| diffusion b4 t0 |" in report_md
    first = _stamps(run)
    run_recipe(load_config(RecipeConfig, None, overrides))
    assert _stamps(run) == first  # nothing changed: every stage skipped
    changed = run_recipe(load_config(RecipeConfig, None, [*overrides, "report.max_new_tokens=6"]))
    collected, adapter, reported, evaluated_at = _stamps(run)
    assert (collected, adapter, evaluated_at) == (*first[:2], first[3]) and reported != first[2]  # the report only
    assert (run / "report" / "report.md").read_text().count("## Accuracy, latency and cost per mode") == 1
    assert changed["settings"]["max_new_tokens"] == 6
    with pytest.raises(ConfigError, match=r"holds checkpoints of a run with other settings \(\['lr'\]\)"):
        run_recipe(load_config(RecipeConfig, None, [*overrides, "train.lr=1e-3"]))  # never mixes two runs
    assert _stamps(run)[:2] == (collected, adapter)


@pytest.mark.slow
def test_recipe_trains_on_a_quantized_base_and_reports_with_the_full_one(tmp_path):
    from nld_lora.adapter.meta import AdapterMeta

    overrides = _tiny_recipe(tmp_path, "report.fastest_mode=false", "train.steps=2", "train.quantization=4bit")
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
    cfg = load_config(RecipeConfig, ROOT / "recipes" / "configs" / f"{name}.yaml")  # unknown keys would fail here
    cfg.train.validate()
    inherit_prompt_format(cfg)
    assert cfg.report.use_chat_template == cfg.collect.use_chat_template  # held-out prompts rendered like training
