"""Three-mode decoding runtime (AR, block diffusion, linear self-speculation) over one KV cache."""

from nld_lora.decoding.api import GenerationResult, generate, max_prompt_tokens
from nld_lora.decoding.settings import DecodeSettings, resolve_draft_len
from nld_lora.decoding.stats import GenerationStats, RequestStats

__all__ = ["DecodeSettings", "GenerationResult", "GenerationStats", "RequestStats", "generate", "max_prompt_tokens",
           "resolve_draft_len"]
