"""Every bad input is refused before any work, through the real CLI: a non-zero exit, a message naming the file,
line or key, and nothing already written changed."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from nld_lora.cli import main
from tests.helpers import make_adapter, saved_tiny_model, tiny_model_with_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return saved_tiny_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def f{i}(a):\n"}) + "\n" for i in range(4)))
    return path


@pytest.fixture
def eval_prompts(tmp_path) -> Path:
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"x{i} =", "reference": " 1"}) + "\n" for i in range(3)))
    return path


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; it must exit non-zero with every needle in its error."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, argv
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("value", ["0", "-1"])
def test_limit_below_one_is_refused_by_every_command(capsys, model_dir, prompts, eval_prompts, tmp_path, value):
    base = ["--model", model_dir]
    refused(capsys, ["collect", *base, "--prompts", str(prompts), "--out", str(tmp_path / "c"), f"limit={value}"],
            "limit: must be >= 1")
    refused(capsys, ["generate", *base, "--prompt-file", str(prompts), f"limit={value}"], "limit: must be >= 1")
    refused(capsys, ["report", *base, "--prompts", str(prompts), "--out", str(tmp_path / "r"), f"limit={value}"],
            "limit: must be >= 1")
    refused(capsys, ["eval", *base, "--prompts", str(eval_prompts), "--out", str(tmp_path / "e"), f"limit={value}"],
            "limit: must be >= 1")
    assert not any((tmp_path / d).exists() for d in "cre")  # nothing was written


def test_ranges_name_their_key(capsys, model_dir, prompts, eval_prompts, tmp_path):
    base = ["--model", model_dir]
    refused(capsys, ["generate", *base, "--prompt", "x", "batch_size=-1"], "batch_size: must be >= 1, got -1")
    refused(capsys, ["collect", *base, "--prompts", str(prompts), "--out", str(tmp_path / "c"), "batch_size=0"],
            "batch_size: must be >= 1, got 0")
    for key in ("bootstrap=0", "latency_prompts=0", "exec_timeout_s=0"):
        refused(capsys, ["eval", *base, "--prompts", str(eval_prompts), key], key.split("=")[0] + ": must be")
    for key in ("speed_rounds=0", "speed_prompts=0"):
        refused(capsys, ["report", *base, "--prompts", str(prompts), key], key.split("=")[0] + ": must be >= 1")
    refused(capsys, ["collect", *base, "--prompts", str(prompts), "--out", str(tmp_path / "c"), "limit="],
            "override 'limit=': empty value")
    refused(capsys, ["collect", *base, "--prompts", str(prompts), "--out", str(tmp_path / "c"),
                     "max_new_tokens=100000"], "max_new_tokens=100000", "positions")
    assert not (tmp_path / "c" / "nld_collect.json").exists()


def test_unknown_keys_get_a_suggestion_and_help_lists_every_key(capsys, model_dir, prompts):
    refused(capsys, ["generate", "--model", model_dir, "--prompt", "x", "max_new_tokes=3"],
            "max_new_tokes (did you mean max_new_tokens?)")
    refused(capsys, ["generate", "--model", model_dir, "--prompt", "x", "decode.temprature=1"],
            "did you mean decode.temperature?")
    for command, key in (("collect", "max_new_tokens=128 (>= 1)"), ("train", "lora.r=128"),
                         ("report", "speed_rounds=3 (>= 1)"), ("eval", "bootstrap=1000 (>= 1)"),
                         ("generate", "decode.draft_len=null")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert key in capsys.readouterr().out, command


def test_config_files_must_be_utf8_mappings(capsys, model_dir, tmp_path):
    for text, needle in (("- a\n- b\n", "expected a mapping of settings"), ("[1, 2]\n", "got a list")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        refused(capsys, ["generate", "--model", model_dir, "--prompt", "x", "--config", str(path)], str(path), needle)
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"max_new_tokens: \xff\xfe\n")
    refused(capsys, ["generate", "--model", model_dir, "--prompt", "x", "--config", str(binary)], str(binary),
            "not UTF-8")


def test_prompt_files_are_read_before_the_model_loads(capsys, tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"prompt": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    missing_model = str(tmp_path / "no-model")  # the prompt error comes first, so the model is never looked at
    refused(capsys, ["collect", "--model", missing_model, "--prompts", str(latin), "--out", str(tmp_path / "c")],
            str(latin), "not UTF-8")
    refused(capsys, ["eval", "--model", missing_model, "--prompts", str(latin)], str(latin), "not UTF-8")
    refused(capsys, ["generate", "--model", missing_model, "--prompt-file", str(latin)], "not UTF-8")


def test_devices_that_are_not_here_are_refused(capsys, model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(capsys, ["generate", "--model", model_dir, "--prompt", "x", "--device", "cuda"],
            "device='cuda': no cuda device")
    refused(capsys, ["generate", "--model", model_dir, "--prompt", "x", "--device", "gpu0"], "device='gpu0'")


def test_read_only_outputs_are_found_before_the_work(capsys, model_dir, prompts, eval_prompts, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a path under a file instead
        blocked = tmp_path / "a-file"
        blocked.write_text("")
        out = blocked / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = ro / "out"
    base = ["--model", model_dir]
    refused(capsys, ["report", *base, "--prompts", str(prompts), "--out", str(out)], str(out), "not writable")
    refused(capsys, ["eval", *base, "--prompts", str(eval_prompts), "--out", str(out)], str(out), "not writable")
    refused(capsys, ["collect", *base, "--prompts", str(prompts), "--out", str(out)], str(out), "not writable")
    data = tmp_path / "data"
    assert main(["collect", *base, "--prompts", str(prompts), "--out", str(data), "--device", "cpu",
                 "max_new_tokens=4"]) == 0
    capsys.readouterr()
    refused(capsys, ["train", *base, "--data", str(data), "--out", str(out)], str(out), "not writable")


def test_a_failed_collect_never_poisons_or_resets_its_folder(capsys, model_dir, prompts, tmp_path):
    out = tmp_path / "c"
    base = ["collect", "--model", model_dir, "--prompts", str(prompts), "--out", str(out), "--device", "cpu"]
    refused(capsys, [*base, "max_new_tokens=-1"], "max_new_tokens: must be >= 1")
    assert not (out / "nld_collect.json").exists()
    assert main([*base, "max_new_tokens=4"]) == 0  # the corrected rerun is not "a different generator"
    capsys.readouterr()
    finished = snapshot(out)
    assert json.loads((out / "nld_collect.json").read_text())["complete"] is True
    edited = tmp_path / "edited.jsonl"
    edited.write_text(prompts.read_text().replace("def f0", "def g0"))
    refused(capsys, ["collect", "--model", model_dir, "--prompts", str(edited), "--out", str(out), "--device", "cpu",
                     "max_new_tokens=4"], "changed since their targets were collected")
    assert snapshot(out) == finished  # the failed rerun left the finished folder as it was


def test_one_collect_writes_a_folder_at_a_time(capsys, model_dir, prompts, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    lock = os.open(out / ".collect.lock.0", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # what a running collect holds
    os.write(lock, b"4242")
    try:
        refused(capsys, ["collect", "--model", model_dir, "--prompts", str(prompts), "--out", str(out), "--device",
                         "cpu", "max_new_tokens=4"], "another collect (pid 4242)")
    finally:
        os.close(lock)
    assert not list(out.rglob("*.parquet"))


def test_train_refuses_an_unfinished_collection_unless_told(capsys, model_dir, prompts, tmp_path):
    out = tmp_path / "c"
    assert main(["collect", "--model", model_dir, "--prompts", str(prompts), "--out", str(out), "--device", "cpu",
                 "max_new_tokens=8"]) == 0
    meta = json.loads((out / "nld_collect.json").read_text())
    (out / "nld_collect.json").write_text(json.dumps({**meta, "complete": False}))  # as a killed collect leaves it
    capsys.readouterr()
    refused(capsys, ["train", "--model", model_dir, "--data", str(out), "--out", str(tmp_path / "t"), "steps=1"],
            str(out), "did not finish", "allow_incomplete_data=true")
    assert not (tmp_path / "t").exists()


def test_adapters_that_do_not_fit_are_refused(capsys, model_dir, tmp_path):
    from nld_lora.adapter.meta import AdapterMeta

    model = tiny_model_with_tokenizer()
    wrong_rank = Path(make_adapter(model, tmp_path / "rank"))
    config = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    refused(capsys, ["generate", "--model", model_dir, "--prompt", "x", "--adapter", str(wrong_rank)],
            "adapter_config.json: r=16", "rank 4")
    other = Path(make_adapter(model, tmp_path / "other"))
    AdapterMeta(base_model="elsewhere", base_weights_hash="0123456789abcdef").write(other)
    refused(capsys, ["generate", "--model", model_dir, "--prompt", "x", "--adapter", str(other)],
            "trained on elsewhere (weights 0123456789abcdef)", "--adapter-other-base")
    assert main(["generate", "--model", model_dir, "--prompt", "x", "--adapter", str(other), "--adapter-other-base",
                 "max_new_tokens=2", "--quiet"]) == 0


def test_eval_refuses_a_baseline_that_is_no_causal_lm(capsys, model_dir, eval_prompts, tmp_path):
    refused(capsys, ["eval", "--model", model_dir, "--prompts", str(eval_prompts), "--out", str(tmp_path / "e"),
                     f"baseline={model_dir}", "diffusion=false", "max_new_tokens=2", "latency_prompts=1"],
            f"baseline={model_dir}", "missing", "--ar-view")


def test_eval_records_invalid_tests_and_failures_with_their_reason(capsys, model_dir, tmp_path):
    from tests.helpers import skip_without_sandbox

    skip_without_sandbox()
    path = tmp_path / "exec.jsonl"
    rows = [{"prompt": "def f():\n", "test": "def check(f):\n    assert False, 'never'\n", "entry_point": "f"},
            {"prompt": "def g():\n", "test": "def check(g)\n", "entry_point": "g"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "e"
    assert main(["eval", "--model", model_dir, "--prompts", str(path), "--out", str(out), "diffusion=false",
                 "max_new_tokens=4", "latency_prompts=1", "bootstrap=10"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["invalid_records"] == [{"line": 2, "reason": "test does not compile: expected ':' (line 1)"}]
    assert result["sandbox"].startswith("bubblewrap")
    failures = result["modes"]["ar"]["execution_failures"]
    assert failures["count"] == 1 and failures["first"][0]["record"] == 0
    assert failures["first"][0]["reason"].startswith("failed:")
    md = (out / "eval.md").read_text()
    assert "records left out because their test cannot run: 1" in md and "line 2: test does not compile" in md
