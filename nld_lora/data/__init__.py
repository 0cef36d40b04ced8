"""Prompt readers, chat-template rendering and AR-target collection (recipe stage 1)."""

from nld_lora.data.collect import CollectConfig, CollectError, collect, load_collected
from nld_lora.data.readers import FieldMap, PromptFileError, PromptRecord, read_prompts

__all__ = ["CollectConfig", "CollectError", "FieldMap", "PromptFileError", "PromptRecord", "collect",
           "load_collected", "read_prompts"]
