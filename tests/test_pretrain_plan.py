"""scripts/pretrain_tiny.py's wall-clock budget: stage lengths from measured step times, full LR decay on time."""

import argparse
import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny import Plan, lr_at  # noqa: E402


def _args(**kw):
    base = dict(minutes=None, ar_fraction=0.4, ar_steps=1200, joint_steps=1600, warmup=5, lr=1e-3)
    return argparse.Namespace(**{**base, **kw})


def _simulate(args, ar_step_s, joint_step_s):
    plan, step, clock = Plan(args), 0, 0.0
    while step < args.ar_steps + args.joint_steps:
        clock += ar_step_s if step < args.ar_steps else joint_step_s
        step += 1
        plan.resolve(step, clock)
    return step, clock


def test_budget_ends_stage_one_at_its_share_and_fills_the_rest():
    args = _args(minutes=1.0)
    steps, clock = _simulate(args, ar_step_s=1.0, joint_step_s=0.5)
    assert args.ar_steps == 24  # 40% of 60 s at 1 s per step
    assert args.joint_steps == 72  # the remaining 36 s at 0.5 s per step
    assert steps == 96 and abs(clock - 60.0) <= 0.5
    assert abs(lr_at(steps - 1, args) - 0.1 * args.lr) < 0.01 * args.lr  # the cosine decay completed


def test_fixed_steps_are_left_alone():
    args = _args()
    steps, _ = _simulate(args, ar_step_s=1.0, joint_step_s=1.0)
    assert (args.ar_steps, args.joint_steps, steps) == (1200, 1600, 2800)
