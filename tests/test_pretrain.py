"""Pretraining's wall-clock budget: stage lengths from measured step times, full LR decay on time."""

import torch

from nld_lora.pretrain.config import PretrainConfig
from nld_lora.pretrain.schedule import Plan, lr_at


def _cfg(**kw) -> PretrainConfig:
    return PretrainConfig(**{**dict(minutes=None, ar_fraction=0.4, ar_steps=1200, joint_steps=1600, warmup=5,
                                    lr=1e-3), **kw})


def _simulate(cfg, ar_step_s, joint_step_s):
    plan, step, clock = Plan(cfg), 0, 0.0
    while step < cfg.total_steps:
        clock += ar_step_s if step < cfg.ar_steps else joint_step_s
        step += 1
        plan.resolve(step, clock)
    return step, clock


def test_budget_ends_stage_one_at_its_share_and_fills_the_rest():
    cfg = _cfg(minutes=1.0)
    steps, clock = _simulate(cfg, ar_step_s=1.0, joint_step_s=0.5)
    assert cfg.ar_steps == 24  # 40% of 60 s at 1 s per step
    assert cfg.joint_steps == 72  # the remaining 36 s at 0.5 s per step
    assert steps == 96 and abs(clock - 60.0) <= 0.5
    assert abs(lr_at(steps - 1, cfg) - 0.1 * cfg.lr) < 0.01 * cfg.lr  # the cosine decay completed


def test_fixed_steps_are_left_alone():
    cfg = _cfg()
    steps, _ = _simulate(cfg, ar_step_s=1.0, joint_step_s=1.0)
    assert (cfg.ar_steps, cfg.joint_steps, steps) == (1200, 1600, 2800)


def test_a_few_steps_of_both_stages_train_save_and_resume(tmp_path, capsys):
    import nld_lora
    from nld_lora.pretrain import pretrain
    from nld_lora.pretrain.corpus import DOC_SEPARATOR

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"def f{i}(a, b):\n    return a * {i} + b\n" * 3 for i in range(40)]
    (corpus / "corpus_train.txt").write_text(DOC_SEPARATOR.join(docs[:32]))
    (corpus / "corpus_eval.txt").write_text(DOC_SEPARATOR.join(docs[32:]))
    cfg = _cfg(corpus=str(corpus), out=str(tmp_path / "model"), work=str(tmp_path / "work"), vocab=300, hidden=32,
               intermediate=64, layers=1, heads=2, kv_heads=1, max_positions=64, seq_len=32, batch=4,
               block_size=4, ar_steps=3, joint_steps=3, warmup=1, ckpt_every=3, autocast=False)
    metrics = pretrain(cfg)
    assert set(metrics["denoise_accuracy"]) == {"0.15", "0.50", "0.90", "1.00"} and metrics["ar_loss_per_token"] > 0
    model = nld_lora.load(str(tmp_path / "model"))
    assert model.block_size == 4 and model.tokenizer is not None
    again = pretrain(_cfg(**{**cfg.__dict__, "joint_steps": 5}))  # resumes at step 6 and runs 2 more joint steps
    assert "resumed at step 6" in capsys.readouterr().out and again["tokens_seen"] == 8 * 4 * 32
    # an interrupted run resumed to the end equals the same run done in one go, weight for weight
    whole = {**cfg.__dict__, "out": str(tmp_path / "whole"), "work": str(tmp_path / "work_whole")}
    pretrain(_cfg(**whole))
    parts = {**cfg.__dict__, "out": str(tmp_path / "parts"), "work": str(tmp_path / "work_parts")}
    assert pretrain(_cfg(**{**parts, "stop_at_step": 4})) == {"stopped_at_step": 4}  # a checkpoint mid-stage 2
    assert not (tmp_path / "parts").exists()
    pretrain(_cfg(**parts))
    a_state = nld_lora.load(str(tmp_path / "whole")).state_dict()
    b_state = nld_lora.load(str(tmp_path / "parts")).state_dict()
    assert a_state.keys() == b_state.keys() and all(torch.equal(a_state[k], b_state[k]) for k in a_state)
