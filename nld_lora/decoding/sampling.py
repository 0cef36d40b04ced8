"""Token selection from logits: greedy, temperature, top-k, top-p; seeded through a torch.Generator."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus(top-p) set to -inf (the set always keeps the argmax).

    Without filtering the logits come back as they are (no copy).
    """
    if (top_k is None or not 0 < top_k < logits.shape[-1]) and (top_p is None or not 0 < top_p < 1):
        return logits
    out = logits.float()
    if top_k is not None and 0 < top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def select_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
    top_k: int | None = None, top_p: float | None = None,
) -> torch.Tensor:
    """argmax at temperature 0, else a sample from softmax(filtered logits / T). Shape: logits.shape[:-1]."""
    if temperature <= 0:
        return logits.argmax(-1)
    return _sample((filter_logits(logits, top_k, top_p).float() / temperature).softmax(-1), generator)


def select_with_confidence(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
    top_k: int | None = None, top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens as select_tokens picks them, plus each token's probability under the distribution used
    (temperature 1 when greedy): one softmax serves both."""
    probs = (filter_logits(logits, top_k, top_p).float() / (temperature if temperature > 0 else 1.0)).softmax(-1)
    tokens = probs.argmax(-1) if temperature <= 0 else _sample(probs, generator)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]
