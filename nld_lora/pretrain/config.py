"""Pretraining settings; the defaults are the shipped embedded base's schedule."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_STEPS = (1200, 1600)  # (stage 1 AR, stage 2 joint): the shipped model's schedule
CPU_MINUTES = 60.0


@dataclass
class PretrainConfig:
    corpus: str = ".cache/corpus"
    out: str = "data/tiny-nld-code"
    work: str = ".cache/pretrain"  # checkpoints for resume
    vocab: int = 4096
    hidden: int = 256
    intermediate: int = 640
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 1024
    seq_len: int = 512
    batch: int = 16
    block_size: int = 16
    alpha: float = 0.3
    ar_steps: int = DEFAULT_STEPS[0]
    joint_steps: int = DEFAULT_STEPS[1]
    minutes: float | None = None  # a wall-clock budget instead of fixed step counts
    ar_fraction: float = 0.4  # share of the budget spent in stage 1
    warmup: int = 100
    lr: float = 3e-3
    ckpt_every: int = 100
    stop_at_step: int | None = None  # end this run early, leaving a resumable checkpoint (the schedule is unchanged)
    seed: int = 0
    device: str = "cpu"
    autocast: bool = True  # bf16 autocast

    @property
    def total_steps(self) -> int:
        """Stage 1 + stage 2 steps (a budget run fixes them while it trains)."""
        return self.ar_steps + self.joint_steps
