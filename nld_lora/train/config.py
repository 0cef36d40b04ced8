"""Training configuration for the draft-pathway LoRA (defaults follow NLD's recipe where it states one)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraSettings:
    r: int = 128
    alpha: int = 512
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["o_proj"])


@dataclass
class TrainConfig:
    lora: LoraSettings = field(default_factory=LoraSettings)
    draft_len: int | None = None  # default: the model's block_size - 1
    blocks_per_seq: int = 8
    batch_size: int = 8  # sequences per micro-step per process
    grad_accum: int = 1
    steps: int = 600
    stop_at_step: int | None = None  # end this run early, leaving a resumable checkpoint
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # cosine | wsd | constant
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    ce_weight: float = 1.0
    distill_weight: float = 1.0
    distill: str = "lk_hybrid"  # lk_hybrid | kl | tv | none
    distill_temperature: float = 3.0
    distill_top: int = 200
    position_weighting: str = "accepted_plus_one"  # accepted_plus_one | uniform
    train_mask_embedding: bool = False  # also retrain the mask token's input embedding (PEFT trainable tokens,
    # saved in the adapter folder; used only where the mask token is fed: draft blocks)
    follow_up_blocks: bool = False  # also train, each step, on the blocks the deployed loop would draft next (start
    # after this step's own accepted drafts + the bonus token): the contexts right after a rejection
    on_policy_blocks: bool = False  # also train, each step, on blocks at cycle starts of the deployed loop: a
    # greedy walk of the current adapter over each target (EAGLE-3's training-time test), blocks_per_seq of them
    first_position_weight: float = 1.0  # loss weight of draft row 1 (every cycle pays for it) relative to the rest
    draft_layout: str = "linear"  # linear (mode self_spec) | quadratic (self_spec_quadratic: the draft block's
    # first token is a mask, not the seed)
    max_seq_len: int = 512
    max_target_tokens: int | None = None  # use only the first N collected target tokens of each sequence
    allow_incomplete_data: bool = False  # train on a collection that did not finish (killed or failed)
    eval_fraction: float = 0.05
    eval_split: str = "group"  # group: hold out whole groups (source files) -> selection by transfer | prompt
    fit_eval: bool = True  # also measure the same metric on as many training sequences (fit vs transfer)
    select_by: str = "deployed"  # the adapter kept: best deployed acceptance (tokens per cycle of the deployed
    # loop's walk over the eval split, what the report measures) or best simulated acceptance (uniform starts)
    eval_max_seqs: int = 64
    eval_blocks_per_seq: int = 16
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    quantization: str | None = None  # None | 4bit (NF4) | 8bit (LLM.int8): a QLoRA base, CPU or GPU
    wandb: bool = False
    wandb_project: str = "nld_lora"
    wandb_mode: str = "offline"

    def validate(self) -> None:
        from nld_lora.config_io import ConfigError

        checks = [
            (self.lora.r > 0, f"lora.r must be > 0; got {self.lora.r}"),
            (self.lora.alpha > 0, f"lora.alpha must be > 0; got {self.lora.alpha}"),
            (bool(self.lora.target_modules), "lora.target_modules must name at least one module"),
            (self.steps > 0, f"steps must be > 0; got {self.steps}"),
            (self.batch_size > 0 and self.blocks_per_seq > 0, "batch_size and blocks_per_seq must be > 0"),
            (self.draft_len is None or self.draft_len >= 1, f"draft_len must be >= 1; got {self.draft_len}"),
            (self.scheduler in ("cosine", "wsd", "constant"), f"scheduler={self.scheduler!r}: cosine|wsd|constant"),
            (self.distill in ("lk_hybrid", "kl", "tv", "none"), f"distill={self.distill!r}: lk_hybrid|kl|tv|none"),
            (self.first_position_weight > 0, f"first_position_weight must be > 0; got {self.first_position_weight}"),
            (self.max_target_tokens is None or self.max_target_tokens >= 2,
             f"max_target_tokens must be >= 2; got {self.max_target_tokens}"),
            (self.draft_layout in ("linear", "quadratic"),
             f"draft_layout={self.draft_layout!r}: linear|quadratic"),
            (self.position_weighting in ("accepted_plus_one", "uniform"),
             f"position_weighting={self.position_weighting!r}: accepted_plus_one|uniform"),
            (self.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision: auto|no|bf16|fp16"),
            (self.quantization in (None, "4bit", "8bit"), f"quantization={self.quantization!r}: null|4bit|8bit"),
            (0 < self.eval_fraction < 1, f"eval_fraction must be in (0, 1); got {self.eval_fraction}"),
            (self.eval_split in ("group", "prompt"), f"eval_split={self.eval_split!r}: group|prompt"),
            (self.select_by in ("deployed", "simulated"), f"select_by={self.select_by!r}: deployed|simulated"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
