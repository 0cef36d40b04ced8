"""bitsandbytes 4-bit / 8-bit quantization of the frozen base (QLoRA); CUDA only."""

from __future__ import annotations

import torch
from torch import nn

from nld_lora.model.nld_config import CheckpointError
from nld_lora.model.trimode import TriModeModel


def quantize_frozen_base(model: TriModeModel, quantization: str) -> None:
    """Swap the backbone's Linear layers for bitsandbytes ones; the head stays in full precision."""
    if quantization not in ("4bit", "8bit"):
        raise CheckpointError(f"quantization={quantization!r}; expected None, '4bit' or '8bit'")
    if not torch.cuda.is_available():
        raise CheckpointError(f"quantization={quantization!r} needs a CUDA device (bitsandbytes); none is available")
    import bitsandbytes as bnb

    for parent in list(model.encoder.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if quantization == "4bit":
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=torch.bfloat16, quant_type="nf4",
                )
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            else:
                new = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False
                )
                new.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                new.bias = child.bias
            setattr(parent, child_name, new.cuda())
