"""Tri-mode model core: checkpoint I/O, attention masks, joint AR + diffusion loss."""

from nld_lora.model.checkpoint import load
from nld_lora.model.nld_config import CheckpointError
from nld_lora.model.saving import save_checkpoint
from nld_lora.model.trimode import TriModeModel, new_model

__all__ = ["CheckpointError", "TriModeModel", "load", "new_model", "save_checkpoint"]
