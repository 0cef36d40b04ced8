"""Several processes: FSDP2 (torch's fully_shard over gloo, 2 ranks) runs the trainer's eval, save and a step
collectively and equals one process; launches that are not one distributed job are refused before anything is
written; FSDP asked for on CPU is said, never silent; wandb stays offline."""

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

import nld_lora
from nld_lora.adapter.attach import add_lora
from nld_lora.adapter.saving import adapter_state
from nld_lora.config_io import ConfigError
from nld_lora.parallel import make_accelerator
from nld_lora.train import TrainConfig, train
from nld_lora.train.trainer import evaluate_drafts, setup_data
from tests.helpers import EMBEDDED, ROOT, fsdp_check_config, fsdp_check_inputs, rank_errors


def _single_process_reference(collected):
    """The same eval, initial adapter and one SGD step (on the mean of both ranks' losses) without sharding."""
    cfg = fsdp_check_config()
    set_seed(cfg.seed)
    model = nld_lora.load(EMBEDDED)
    _, eval_seqs = setup_data(model, collected, cfg)
    peft_model = add_lora(model, cfg)
    before = evaluate_drafts(model, eval_seqs, cfg, cfg.draft_len, adapter="default")
    init = adapter_state(peft_model)
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    opt = torch.optim.SGD(params, lr=1.0)
    with model.adapter_enabled("default", True):
        for p in params:
            p.requires_grad_(True)
        loss = sum(model(**fsdp_check_inputs(r))[0].float().logsumexp(-1).mean() for r in range(2)) / 2
        loss.backward()
    opt.step()
    after = evaluate_drafts(model, eval_seqs, cfg, cfg.draft_len, adapter="default")
    return before, init, adapter_state(peft_model), after


@pytest.mark.slow
def test_fsdp2_eval_save_and_step_are_collective_and_equal_one_process(collected, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(collected), str(tmp_path)]
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, rank_errors(done.stderr)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2 and result["sharded_params"] > 0 and result["ranks_agree"]
    before, init, stepped, after = _single_process_reference(collected)
    for key in ("simulated_acceptance", "deployed_acceptance", "mean_block_acceptance", "blocks"):
        assert result["eval_before"][key] == pytest.approx(before[key], abs=1e-9)
        assert result["eval_after"][key] == pytest.approx(after[key], abs=1e-9)
    for name, ref in (("adapter_init", init), ("adapter_stepped", stepped)):
        saved = load_file(str(tmp_path / name / "adapter_model.safetensors"))  # plain tensors, PEFT's keys
        expected = {k.replace(".default.", "."): v for k, v in ref.items()}
        assert saved.keys() == expected.keys()
        for k in saved:
            torch.testing.assert_close(saved[k], expected[k], atol=1e-5, rtol=1e-4)
    assert not torch.equal(load_file(str(tmp_path / "adapter_init" / "adapter_model.safetensors"))[k], saved[k])
    model = nld_lora.load(EMBEDDED)
    model.attach_adapter(str(tmp_path / "adapter_stepped"))  # the sharded run's adapter loads and drafts
    prompts = ["def add(a, b):\n", "class Stack:\n"]
    assert model.generate(prompts, mode="self_spec", max_new_tokens=24).sequences == \
        model.generate(prompts, mode="ar", adapter=False, max_new_tokens=24).sequences


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine: accelerate then sets up one process")
def test_processes_that_are_not_one_job_are_refused(monkeypatch, tmp_path):
    """WORLD_SIZE=2 but accelerate made a single non-distributed process (e.g. a GPU Accelerator on a CPU box):
    each process would believe it is rank 0 and write the same folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2\) that are not one distributed job"):
        make_accelerator(cpu=False, project_dir=tmp_path / "run")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP through accelerate needs GPUs"):
        make_accelerator(cpu=False, project_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP shards on GPUs; this checks the CPU fallback")
def test_fsdp_launch_on_cpu_says_it_runs_ddp(collected, tmp_path):
    """`accelerate launch --use_fsdp --num_processes 2` on CPU: accelerate cannot shard there; the run says so,
    trains data parallel and records it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--use_fsdp",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nld_lora.cli", "train",
           "--model", EMBEDDED, "--data", str(collected), "--out", str(tmp_path / "run"), "steps=2", "eval_every=2",
           "save_every=2", "eval_fraction=0.25", "lora.r=4", "lora.alpha=8"]
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, rank_errors(done.stderr)
    assert "FSDP was asked for, but accelerate shards only on GPUs; this run is ddp with 2" in done.stdout
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["processes"] == 2 and summary["parallelism"] == "ddp"


@pytest.mark.slow
def test_wandb_logs_offline_into_the_run_folder(collected, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(EMBEDDED, collected, tmp_path / "run", TrainConfig(steps=2, eval_every=2, save_every=2, log_every=1,
                                                              eval_fraction=0.25, wandb=True), progress=False)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb")), "no offline wandb run folder"
    assert os.environ["WANDB_MODE"] == "offline"
