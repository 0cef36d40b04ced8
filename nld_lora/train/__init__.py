"""Draft-pathway LoRA training: objective, data, loop."""

from nld_lora.train.config import LoraSettings, TrainConfig
from nld_lora.train.trainer import TrainResult, train

__all__ = ["LoraSettings", "TrainConfig", "TrainResult", "train"]
