"""Turn prompt records into model input text with the tokenizer's own chat template (no hand-written ones)."""

from __future__ import annotations

from typing import Any

from nld_lora.data.readers import PromptFileError, PromptRecord


def render_prompt(record: PromptRecord, tokenizer: Any, *, system_prompt: str | None = None,
                  use_chat_template: bool | None = None) -> str:
    """Conversations go through tokenizer.apply_chat_template(add_generation_prompt=True).

    Plain text prompts are used as they are unless use_chat_template=True (None: only when a system prompt is
    given and the tokenizer has a template). Without a template a system prompt is prepended with a blank line.
    """
    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None
    messages = record.messages
    if messages is None and (use_chat_template or (use_chat_template is None and system_prompt and has_template)):
        messages = [{"role": "user", "content": record.prompt}]
    if messages is not None:
        if not has_template:
            raise PromptFileError(f"prompt {record.id}: is a conversation but the tokenizer has no chat template")
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = record.prompt or ""
    return f"{system_prompt}\n\n{text}" if system_prompt else text
