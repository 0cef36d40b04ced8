"""nld_lora: train a draft-pathway LoRA that raises self-speculative acceptance of tri-mode LMs on your traffic."""

from nld_lora.decoding.settings import DecodeSettings
from nld_lora.model import CheckpointError, TriModeModel, load

__all__ = ["CheckpointError", "DecodeSettings", "TriModeModel", "load"]
__version__ = "0.1.0"
