"""Learning-rate schedule, data order and the wall-clock budget plan of pretraining."""

from __future__ import annotations

import math

import torch

from nld_lora.pretrain.config import PretrainConfig


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant through stage 1, cosine decay to 10% over stage 2."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if step < cfg.ar_steps:
        return cfg.lr
    frac = (step - cfg.ar_steps) / max(cfg.total_steps - cfg.ar_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def batch_for(step: int, rows: int, batch: int, seed: int) -> torch.Tensor:
    """Row indices of a step: a seeded permutation per epoch, so resume replays the same order."""
    per_epoch = rows // batch
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[offset * batch:(offset + 1) * batch]


class Plan:
    """Wall-clock budget (cfg.minutes): stage 1 ends at cfg.ar_fraction of the budget; stage 2's step count is set
    from the speed of PROBE of its steps so that training, with its full LR decay, ends on time."""

    PROBE = 50
    UNSET = 10**9

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg, self.on = cfg, cfg.minutes is not None
        self.probe_start: tuple[int, float] | None = None
        if self.on:
            cfg.ar_steps, cfg.joint_steps = self.UNSET, self.UNSET

    def resolve(self, step: int, elapsed_s: float) -> bool:
        """Fix a stage length once it is known; True when the plan changed."""
        if not self.on:
            return False
        cfg, budget_s = self.cfg, self.cfg.minutes * 60
        if cfg.ar_steps == self.UNSET:
            if elapsed_s < cfg.ar_fraction * budget_s:
                return False
            cfg.ar_steps = step
            return True
        if cfg.joint_steps != self.UNSET:
            return False
        if self.probe_start is None:
            self.probe_start = (step, elapsed_s)
        elif step == self.probe_start[0] + self.PROBE:
            per_step = (elapsed_s - self.probe_start[1]) / self.PROBE
            cfg.joint_steps = step - cfg.ar_steps + max(int((budget_s - elapsed_s) / per_step), 0)
            return True
        return False
