"""QLoRA base: the backbone's Linear layers as bitsandbytes 4-bit (NF4) or 8-bit layers, CPU or GPU.

The layers are swapped by transformers' bitsandbytes integration (`replace_with_bnb_linear` with a
`BitsAndBytesConfig`, as `from_pretrained(quantization_config=...)` does); the loaded full-precision weights are
then quantized into them on the model's device. The head (`diffusion_head`), the embeddings and the norms stay in
full precision, and so does every LoRA layer PEFT later puts on top.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

from nld_lora.adapter.attach import PeftState
from nld_lora.adapter.layers import structure_copy
from nld_lora.model.nld_config import CheckpointError
from nld_lora.model.trimode import TriModeModel

QUANTIZATIONS = ("4bit", "8bit")


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """The transformers BitsAndBytesConfig for a QLoRA base: NF4 with double quantization, or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def import_bitsandbytes(device: torch.device) -> Any:
    """bitsandbytes, with its CPU backend's warning about the optional kernels-community fused 4-bit gemm replaced
    by one line on what a CPU run uses instead."""
    ops_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = ops_logger.level
    ops_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    finally:
        ops_logger.setLevel(level)
    if device.type == "cpu":
        print("note: quantized layers on CPU run bitsandbytes' own CPU kernels (NF4 / int8 dequantize + matmul)",
              file=sys.stderr)
    return bnb


def quantize_frozen_base(model: TriModeModel, quantization: str, device: torch.device | str | None = None) -> None:
    """Quantize the backbone's Linear layers in place on `device` (default: where the model is); frozen."""
    if quantization not in QUANTIZATIONS:
        raise CheckpointError(f"quantization={quantization!r}; expected None, '4bit' or '8bit'")
    target = torch.device(device) if device is not None else model.device
    try:
        bnb = import_bitsandbytes(target)
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    except ImportError as err:
        raise CheckpointError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes") from err
    originals = {name: m for name, m in model.encoder.named_modules() if type(m) is nn.Linear}
    config = bnb_config(quantization, model.dtype)
    replace_with_bnb_linear(model.encoder, quantization_config=config)
    for name, old in originals.items():
        new = model.encoder.get_submodule(name)
        weight = old.weight.detach()
        if quantization == "4bit":
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                           quant_storage=config.bnb_4bit_quant_storage, module=new).to(target)
            # bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel on the first eval-mode
            # no-grad forward; after that, training forwards take a path that gives no input gradients.
            new.support_avx512bf16_for_cpu = False
        else:
            new.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False,
                                           has_fp16_weights=False).to(target)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().to(target), requires_grad=False)
    model.quantization = quantization


def quantized_twin(model: TriModeModel, quantization: str) -> TriModeModel:
    """A QLoRA copy of `model` for training: its own module tree with quantized backbone Linears, every other
    tensor shared. The full-precision model is left as it was (collection and reports keep using it)."""
    if model.adapters:
        raise CheckpointError(f"{model.name_or_path}: detach its adapters {sorted(model.adapters)} before making a "
                              "quantized training copy")
    twin = structure_copy(model)
    twin.adapters, twin.active_adapter = {}, None  # per-model runtime state, not shared with the original
    twin.peft_state = PeftState()
    quantize_frozen_base(twin, quantization)
    return twin
