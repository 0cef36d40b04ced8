"""Pick the implementation: Triton for CUDA tensors; elsewhere a whole-batch PyTorch path for greedy drafts of one
length (the runtime's case), else the PyTorch reference; overridable."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from nld_lora.kernels import batched, reference

_BACKEND = os.environ.get("NLD_LORA_VERIFY_BACKEND", "auto")
BACKENDS = ("auto", "triton", "reference")


def set_backend(name: str) -> None:
    """'auto' (Triton on CUDA, else reference), 'triton' (forced; also runs under TRITON_INTERPRET=1 on CPU)
    or 'reference'."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"verify backend {name!r}; expected one of {BACKENDS}")
    _BACKEND = name


def _use_triton(t: torch.Tensor) -> bool:
    if _BACKEND == "reference":
        return False
    if _BACKEND == "triton":
        return True
    return t.is_cuda


def verify_greedy(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, cu_draft_lens: torch.Tensor | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """See nld_lora.kernels.reference.verify_greedy."""
    if _use_triton(target_logits):
        from nld_lora.kernels import triton_verify

        return triton_verify.verify_greedy(target_logits, draft_tokens, cu_draft_lens)
    if _BACKEND == "auto" and batched.uniform_draft_len(cu_draft_lens) is not None:
        return batched.verify_greedy(target_logits, draft_tokens, cu_draft_lens)
    return reference.verify_greedy(target_logits, draft_tokens, cu_draft_lens)


def verify_sampled(
    target_logits: torch.Tensor, draft_logits: torch.Tensor, draft_tokens: torch.Tensor,
    cu_draft_lens: torch.Tensor | Sequence[int], temperature: torch.Tensor, seeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See nld_lora.kernels.reference.verify_sampled."""
    if _use_triton(target_logits):
        from nld_lora.kernels import triton_verify

        return triton_verify.verify_sampled(target_logits, draft_logits, draft_tokens, cu_draft_lens, temperature,
                                            seeds)
    return reference.verify_sampled(target_logits, draft_logits, draft_tokens, cu_draft_lens, temperature, seeds)
