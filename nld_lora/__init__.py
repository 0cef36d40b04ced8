"""nld_lora: train a draft-pathway LoRA that raises self-speculative acceptance of tri-mode LMs on your traffic."""

from nld_lora.model import CheckpointError, TriModeModel, load

__all__ = ["CheckpointError", "TriModeModel", "load"]
__version__ = "0.1.0"
