"""Inference-only twins of the backbone that skip PEFT's per-layer wrappers.

With an adapter attached, every targeted Linear goes through PEFT's LoRA wrapper even when the adapter is off;
on a small or launch-bound model that doubles the cost of an AR or verify forward. The runtime therefore keeps:
- a base twin: the backbone's module tree as it was before PEFT wrapped it (the same leaf modules and weights), for
  forwards with the adapter off;
- a merged twin per adapter: the base twin with each targeted Linear replaced by one holding W + scaling * B @ A,
  for forwards with the adapter on (drafts), at the base model's cost. It copies the targeted weights only; token
  embeddings the adapter retrains (PEFT's trainable tokens, e.g. the mask token) read its rows;
- a gated twin per adapter: targeted Linears compute base(x) and add scaling * B A x on the drafting tokens only
  (those from a start index on), for forwards whose tokens are partly drafts (single-forward self-speculation); it
  shares the base weights and copies the adapter's small A/B.
Adapters being trained and quantized bases keep using PEFT.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn


def structure_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose containers are new objects and whose leaves (modules without children) are
    the same objects: parameters are shared, and wrapping a child in the original no longer shows in the copy."""
    if not module._modules:
        return module
    twin = copy.copy(module)
    twin._modules = {name: child if child is None else structure_copy(child) for name, child in module._modules.items()}
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    return twin


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the module at `path` in `root`'s tree (in root's own containers only)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    parent._modules[name] = new


def lora_layers(wrapped: nn.Module, adapter: str) -> Iterator[tuple[str, nn.Module]]:
    """(path, PEFT LoRA layer) for every layer of `wrapped` that carries adapter `adapter`."""
    for path, layer in wrapped.named_modules():
        lora_a = getattr(layer, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
            yield path, layer


def token_layers(wrapped: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(path, PEFT TrainableTokensWrapper) for every embedding whose rows adapter `adapter` retrains (None: any)."""
    for path, module in wrapped.named_modules():
        deltas = getattr(getattr(module, "token_adapter", None), "trainable_tokens_delta", None)
        if isinstance(deltas, nn.ParameterDict) and (adapter in deltas if adapter else len(deltas)):
            yield path, module


class TokenRowsEmbedding(nn.Module):
    """An embedding whose rows `indices` read `rows` instead (an adapter's retrained tokens, e.g. the mask token):
    PEFT's TrainableTokens forward, without copying the whole matrix on every call."""

    def __init__(self, base: nn.Embedding, indices: list[int], rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.indices = list(indices)
        self.rows = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        for row, index in zip(self.rows, self.indices):
            out = torch.where((ids == index)[..., None], row.to(out.dtype), out)
        return out


def _twin_with(base_twin: nn.Module, wrapped: nn.Module, adapter: str,
               build: Callable[[nn.Linear, nn.Module], nn.Module]) -> nn.Module | None:
    """base_twin with each Linear that PEFT wrapped for `adapter` in `wrapped` (the same tree after PEFT) replaced by
    build(base Linear, PEFT layer); None when a wrapped layer is not a plain Linear (quantized) or uses a LoRA
    variant."""
    twin = structure_copy(base_twin)
    for path, layer in lora_layers(wrapped, adapter):
        base = layer.get_base_layer()
        if type(base) is not nn.Linear or adapter in getattr(layer, "lora_variant", {}):
            return None
        set_submodule(twin, path, build(base, layer))
    for path, wrapper in token_layers(wrapped, adapter):
        tokens = wrapper.token_adapter
        set_submodule(twin, path, TokenRowsEmbedding(tokens.base_layer, tokens.token_indices[adapter],
                                                     tokens.trainable_tokens_delta[adapter].detach()))
    return twin


def merged_copy(base_twin: nn.Module, wrapped: nn.Module, adapter: str) -> nn.Module | None:
    """base_twin with adapter `adapter` merged into copies of the Linear layers it targets (see _twin_with)."""

    def merge(base: nn.Linear, layer: nn.Module) -> nn.Linear:
        lora_bias = layer.lora_B[adapter].bias  # lora_bias=True adapters: scaling * b joins the base bias (as PEFT)
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None or lora_bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(base.weight + layer.get_delta_weight(adapter).to(base.weight.dtype))
            if merged.bias is not None:
                merged.bias.zero_()
                if base.bias is not None:
                    merged.bias.add_(base.bias)
                if lora_bias is not None:
                    merged.bias.add_(lora_bias.to(base.weight.dtype) * layer.scaling[adapter])
        return merged.requires_grad_(False)

    return _twin_with(base_twin, wrapped, adapter, merge)


class GatedLoRALinear(nn.Module):
    """base(x), plus scaling * (B @ A @ x + b) on the tokens from index holder.start on (a TokenGate; None: every
    token), where b is the adapter's lora_B bias if it has one. The delta runs on those tokens only and is added in
    place, so the tokens before start are the base layer's output bit for bit, at the cost of two small matmuls."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, holder,
                 lora_bias: torch.Tensor | None = None):
        super().__init__()
        dtype = base.weight.dtype
        self.base = base
        self.lora_a = lora_a.detach().to(dtype)
        self.lora_b = (lora_b.detach() * scaling).to(dtype)  # scaling folded in once, not per call
        self.lora_bias = None if lora_bias is None else (lora_bias.detach() * scaling).to(dtype)
        self.holder = holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.base.weight, self.base.bias)
        start = self.holder.start or 0
        if start < x.shape[-2]:
            low = nn.functional.linear(x[..., start:, :], self.lora_a)
            out[..., start:, :] += nn.functional.linear(low, self.lora_b, self.lora_bias)
        return out


def gated_copy(base_twin: nn.Module, wrapped: nn.Module, adapter: str, holder) -> nn.Module | None:
    """base_twin with each Linear the adapter targets replaced by a GatedLoRALinear sharing its base weights (see
    _twin_with)."""
    return _twin_with(base_twin, wrapped, adapter, lambda base, layer: GatedLoRALinear(
        base, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter]), holder,
        layer.lora_B[adapter].bias))
