"""Tri-mode model core: checkpoint I/O, attention masks, joint AR + diffusion loss."""

from nld_lora.model.checkpoint import load, new_model, save_checkpoint
from nld_lora.model.nld_config import CheckpointError
from nld_lora.model.trimode import TriModeModel

__all__ = ["CheckpointError", "TriModeModel", "load", "new_model", "save_checkpoint"]
