"""Pretraining of the embedded tiny tri-mode base with NLD's two-stage recipe (AR, then joint AR + diffusion)."""

from nld_lora.pretrain.config import PretrainConfig
from nld_lora.pretrain.evaluate import evaluate_base
from nld_lora.pretrain.loop import pretrain

__all__ = ["PretrainConfig", "evaluate_base", "pretrain"]
