"""Turn prompt records into model input text with the tokenizer's own chat template (no hand-written ones)."""

from __future__ import annotations

from typing import Any

from nld_lora.data.readers import PromptFileError, PromptRecord


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None


def uses_chat_template(record: PromptRecord, tokenizer: Any, *, system_prompt: str | None = None,
                       use_chat_template: bool | None = None) -> bool:
    """Whether render_prompt sends this record through the chat template."""
    if record.messages is not None:
        return True
    return bool(use_chat_template or (use_chat_template is None and system_prompt and has_chat_template(tokenizer)))


def render_prompt(record: PromptRecord, tokenizer: Any, *, system_prompt: str | None = None,
                  use_chat_template: bool | None = None) -> str:
    """Conversations go through tokenizer.apply_chat_template(add_generation_prompt=True).

    Plain text prompts are used as they are unless use_chat_template=True (None: only when a system prompt is
    given and the tokenizer has a template). Without a template a system prompt is prepended with a blank line.
    """
    has_template = has_chat_template(tokenizer)
    messages = record.messages
    if messages is None and uses_chat_template(record, tokenizer, system_prompt=system_prompt,
                                               use_chat_template=use_chat_template):
        messages = [{"role": "user", "content": record.prompt}]
    if messages is not None:
        if not has_template:
            raise PromptFileError(f"prompt {record.id}: is a conversation but the tokenizer has no chat template")
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = record.prompt or ""
    return f"{system_prompt}\n\n{text}" if system_prompt else text
