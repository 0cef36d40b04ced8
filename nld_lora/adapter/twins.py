"""Decode-only state of a model, owned by the runtime: inference twins of the backbone, per-token LoRA gates and
the forward costs draft_len="auto" measured.

With an adapter attached every targeted Linear goes through PEFT's LoRA wrapper, even with the adapter off; on a
small or launch-bound model that doubles a forward's cost. So the runtime runs, where it can (adapter/layers.py
builds them): the base twin (the backbone's tree with each PEFT wrapper replaced by its base layer) for forwards
with adapters off, a merged twin per adapter for drafts, a gated twin per adapter for forwards that verify and draft
at once. PEFT's own modules run where no twin can be built (quantized bases, LoRA variants) and for adapters being
trained (their weights change every step). The state is rebuilt whenever the model's set of adapters changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nld_lora.adapter.attach import lora_enabled, peft_of
from nld_lora.adapter.layers import (
    gated_copy,
    lora_layers,
    merged_copy,
    set_submodule,
    structure_copy,
    token_layers,
)


class TokenGate:
    """Where the current forward's drafting tokens start: tokens at index >= start run with the adapter on (None:
    no gate, every token). The gated twin's layers read it; as a forward pre-hook on PEFT's LoRA A matrices it
    zeroes their input before start. Installed once per adapter, so compiled forwards see the same hooks every
    call."""

    def __init__(self) -> None:
        self.start: int | None = None

    def __call__(self, _module: nn.Module, args: tuple) -> tuple | None:
        if self.start is None:
            return None
        x = args[0]
        drafting = torch.arange(x.shape[-2], device=x.device) >= self.start
        return (x * drafting[:, None].to(x.dtype),)


@dataclass
class DecodeState:
    """One model's decode-only state (see the module docstring); `twins=False` always runs PEFT's modules (the
    reference path the twins are tested against)."""

    adapters: tuple = ()  # the adapter set this state was built for: (name, LoadedAdapter.serial) pairs
    twins: bool = True
    base: nn.Module | None = None  # built on first use
    merged: dict[str, nn.Module | bool] = field(default_factory=dict)  # False: this adapter cannot merge
    gated: dict[str, nn.Module | bool] = field(default_factory=dict)
    gates: dict[str, TokenGate] = field(default_factory=dict)
    gate_hooked: set[str] = field(default_factory=set)
    compile_mode: bool | str = False  # the torch.compile mode of the decode in progress: twins built during it
    # are compiled as they are built (api.compiled_backbone)
    forward_costs: dict[tuple, float] = field(default_factory=dict)  # (device, compiled, rows bucket, width) -> s
    planner_memory: dict[tuple, dict] = field(default_factory=dict)  # (adapter, layout, rows) -> what the last
    # draft_len="auto" planner learnt (rates, cost ratios): the next decode batch starts from it


_STATES: weakref.WeakKeyDictionary[nn.Module, DecodeState] = weakref.WeakKeyDictionary()


def decode_state(model) -> DecodeState:
    """The model's decode state, rebuilt (measured costs kept) when its adapters changed since it was built."""
    adapters = tuple((name, loaded.serial) for name, loaded in model.adapters.items())
    state = _STATES.get(model)
    if state is None:
        state = _STATES[model] = DecodeState(adapters)
    elif state.adapters != adapters:
        state = _STATES[model] = DecodeState(adapters, state.twins, forward_costs=state.forward_costs)
    return state


def planner_memory(model) -> dict[tuple, dict]:
    """What draft_len="auto" learnt in this process, per (adapter, draft layout, rows bucket) (decoding/auto.py)."""
    return decode_state(model).planner_memory


def forward_costs(model) -> dict[tuple, float]:
    """Forward wall times draft_len="auto" measured on this model: (device, compiled, rows bucket, width) -> s."""
    return decode_state(model).forward_costs


def compile_module(module: nn.Module, mode: bool | str) -> None:
    """torch.compile a backbone tree in place for decoding: dynamic shapes, or CUDA graphs with "reduce-overhead"."""
    if mode == "reduce-overhead":
        module.compile(mode="reduce-overhead")
    else:
        module.compile(dynamic=True)


def _adopt(state: DecodeState, twin: nn.Module | bool) -> nn.Module | bool:
    """A twin just built, compiled when a compiled decode is in progress (else its first call ran eager: drafts were
    built inside the first cycle that needs them, after the call had compiled the backbones it found)."""
    if state.compile_mode and isinstance(twin, nn.Module):
        compile_module(twin, state.compile_mode)
    return twin


def _twins_allowed(model, state: DecodeState) -> bool:
    return state.twins and peft_of(model) is not None and not any(a.trainable for a in model.adapters.values())


def base_twin(model) -> nn.Module | None:
    """The backbone without PEFT's wrappers (same leaf modules and weights), or None where PEFT must run."""
    state = decode_state(model)
    if not _twins_allowed(model, state):
        return None
    if state.base is None:
        twin = structure_copy(model.encoder)
        for name in model.adapters:
            for path, layer in lora_layers(model.encoder, name):
                set_submodule(twin, path, layer.get_base_layer())
        for path, wrapper in token_layers(model.encoder):  # retrained token rows: the original embedding
            set_submodule(twin, path, wrapper.token_adapter.base_layer)
        state.base = _adopt(state, twin)
    return state.base


def pathway_encoder(model, adapter: str | None, on: bool) -> nn.Module | None:
    """The backbone twin for a forward with adapter `adapter` on or off; None where the PEFT-wrapped backbone must
    run instead."""
    base = base_twin(model)
    if base is None or (on and adapter is None):
        return None
    if not on:
        return base
    state = decode_state(model)
    if adapter not in state.merged:
        state.merged[adapter] = _adopt(state, merged_copy(base, model.encoder, adapter) or False)
    return state.merged[adapter] or None


def gated_encoder(model, adapter: str) -> tuple[nn.Module | None, TokenGate]:
    """(the gated twin of adapter `adapter` or None where PEFT must run, its gate holder)."""
    state = decode_state(model)
    gate = state.gates.setdefault(adapter, TokenGate())
    base = base_twin(model)
    if base is not None and adapter not in state.gated:
        state.gated[adapter] = _adopt(state, gated_copy(base, model.encoder, adapter, gate) or False)
    return (state.gated.get(adapter) or None), gate


def build_twins(model, adapter: str | None, gated: bool) -> None:
    """Build now the twins a decode with `adapter` runs (the merged one; with `gated`, the gated one too), so that
    their one-off construction is not timed as a cycle: draft_len="auto" prices a kind of cycle by its measured
    time, so a twin built inside a draft cycle would price drafting out. The base twin is built by then: the
    prefill runs on it."""
    if adapter is not None:
        pathway_encoder(model, adapter, on=True)
        if gated:
            gated_encoder(model, adapter)


def decode_encoders(model) -> list[nn.Module]:
    """Every backbone tree the runtime may run: the model's own and the inference twins built so far."""
    state = decode_state(model)
    twins = [state.base, *state.merged.values(), *state.gated.values()]
    return [model.encoder] + [t for t in twins if isinstance(t, nn.Module)]


def _install_gate_hooks(model, adapter: str, hook: TokenGate) -> None:
    state = decode_state(model)
    if adapter not in state.gate_hooked:
        for _, layer in lora_layers(peft_of(model).base_model.model, adapter):
            if getattr(layer.lora_B[adapter], "bias", None) is not None:
                raise ValueError(f"adapter {adapter!r} has lora_B biases, which gating its input cannot switch off; "
                                 "its single-forward mode needs the gated twin (a plain, unquantized base)")
            layer.lora_A[adapter].register_forward_pre_hook(hook)
        state.gate_hooked.add(adapter)


@contextmanager
def lora_token_gate(model, adapter: str, start: int) -> Iterator[Any]:
    """Run the enclosed forwards with adapter `adapter` on for their tokens at index >= start (the drafting ones)
    and off for the others; yields the backbone twin to run (adapter/layers.py GatedLoRALinear), or None to run the
    PEFT model, whose LoRA A matrices then see a zero input before start. Either way a gated-off token's delta is
    exactly 0 and its output equals the base model's bit for bit."""
    encoder, hook = gated_encoder(model, adapter)
    hook.start = start
    try:
        if encoder is not None:
            yield encoder
        else:
            _install_gate_hooks(model, adapter, hook)
            with lora_enabled(model, adapter, True):
                yield None
    finally:
        hook.start = None
