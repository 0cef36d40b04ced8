"""PEFT LoRA adapters owned by a TriModeModel: attach/detach, per-adapter lora_mode, on/off switching per forward.

lora_mode "draft_only" (NLD's deployment): the adapter is ON for draft/denoise forwards and OFF for prefill, AR,
verify and commit forwards, so AR output is untouched. "both": ON for every forward (output then differs from AR).
A forward that verifies and drafts at once (single-forward self-speculation) gates the adapter per token instead.
An adapter folder may carry nld_adapter.json (written by the trainer); its lora_mode and draft_len are the defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from nld_lora.model.adapter_meta import LORA_MODES, AdapterMeta, AdapterMetaError
from nld_lora.model.pathways import gated_copy, lora_layers, merged_copy, structure_copy


class AdapterError(ValueError):
    """An adapter folder that does not fit the model."""


@dataclass
class LoadedAdapter:
    """One adapter on the model: where it came from, when it is on, and its nld_adapter.json."""

    path: str
    lora_mode: str = "draft_only"
    meta: AdapterMeta = field(default_factory=AdapterMeta)
    trainable: bool = False  # the trainer's adapter; loaded ones stay in inference mode (no gradients)
    gate: TokenGate | None = None  # per-token gate holder (single-forward self-spec), created on first use
    gate_hooked: bool = False  # the holder is installed as a pre-hook on this adapter's PEFT LoRA A matrices
    merged: nn.Module | bool | None = None  # inference twin with this adapter merged (False: cannot merge)
    gated: nn.Module | bool | None = None  # inference twin with a per-token gated delta (False: cannot build)


def check_lora_mode(lora_mode: str) -> str:
    if lora_mode not in LORA_MODES:
        raise AdapterError(f"lora_mode={lora_mode!r}; expected one of {LORA_MODES}")
    return lora_mode


@dataclass
class PeftState:
    """What attaching adapters adds to a model, held outside its module tree (a plain object, so nn.Module does
    not register it: the PeftModel wraps the model, and registering it would make the model contain itself)."""

    peft: Any = None  # the PeftModel wrapping the model
    base_encoder: nn.Module | None = None  # the backbone's module tree before PEFT wrapped it (model/pathways.py)


def peft_of(model) -> Any:
    """The PeftModel wrapping `model`, or None."""
    return model.peft_state.peft


def base_encoder(model) -> nn.Module | None:
    """The adapter-off inference twin of the backbone (None when no adapter was attached through attach_adapter)."""
    return model.peft_state.base_encoder


def _set_peft(model, peft) -> None:
    model.peft_state.peft = peft


def check_adapter_matches(model, path: str | Path) -> None:
    """Compare every LoRA A/B tensor with the module it targets; name the first mismatching module/shape."""
    folder = Path(path)
    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").exists() or not weights.exists():
        raise AdapterError(f"{folder}: not a PEFT adapter folder (needs adapter_config.json + adapter_model.safetensors)")
    modules = dict(model.named_modules())
    try:
        handle_ctx = safe_open(str(weights), framework="pt")
    except Exception as err:  # SafetensorError / OSError: a bad header, a short or empty file
        raise AdapterError(f"{weights}: cannot read this safetensors file ({err}); it is corrupt or truncated") \
            from err
    with handle_ctx as handle:
        for key in handle.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            module = modules.get(name)
            if module is not None and hasattr(module, "base_layer"):
                module = module.base_layer
            if not isinstance(module, nn.Linear):
                raise AdapterError(f"{folder}: adapter targets module {name!r}, which the model does not have as Linear")
            shape = tuple(handle.get_slice(key).get_shape())
            if ".lora_A." in key and shape[1] != module.in_features:
                raise AdapterError(f"{folder}: {name}: lora_A expects in_features {shape[1]}, "
                                   f"model has {module.in_features} (adapter shape {shape})")
            if ".lora_B." in key and shape[0] != module.out_features:
                raise AdapterError(f"{folder}: {name}: lora_B expects out_features {shape[0]}, "
                                   f"model has {module.out_features} (adapter shape {shape})")


def attach_adapter(model, path: str | Path, *, name: str | None = None, lora_mode: str | None = None) -> str:
    """Load a PEFT folder onto the model (several may be loaded); it becomes the active adapter.

    path may name a subfolder of the model's own folder (a release's "linear_spec_lora"). lora_mode None takes
    the adapter's nld_adapter.json, else "draft_only".
    """
    from peft import PeftConfig, PeftModel

    inside = Path(model.source_folder or ".") / path
    if not Path(path).exists() and inside.is_dir():
        path = inside
    try:
        meta = AdapterMeta.read(path)
    except AdapterMetaError as err:
        raise AdapterError(str(err)) from err
    mode = check_lora_mode(lora_mode or meta.lora_mode)
    check_adapter_matches(model, path)
    if name is not None and "." in name:
        raise AdapterError(f"adapter name {name!r}: PEFT module names cannot contain '.'")
    if name is not None and name in model.adapters:
        raise AdapterError(f"an adapter named {name!r} is attached already (from {model.adapters[name].path}); "
                           "detach it first or pick another name")
    name = name or unique_name(Path(path).name.replace(".", "_") or "default", model.adapters)
    peft = peft_of(model)
    if peft is None:
        model.peft_state.base_encoder = structure_copy(model.encoder)  # before PEFT wraps its Linear layers
        # Any task_type loads (NVIDIA ships CAUSAL_LM): the runtime drives the model itself, so PEFT's plain
        # wrapper is used instead of a task wrapper that expects transformers' generate hooks.
        config = PeftConfig.from_pretrained(str(path))
        config.task_type = None
        peft = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False, config=config)
        _set_peft(model, peft)
    else:
        peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
    model.adapters[name] = LoadedAdapter(str(path), mode, meta)
    model.active_adapter = name
    peft.base_model.set_adapter(name, inference_mode=True)
    peft.base_model.disable_adapter_layers()
    return name


def unique_name(base: str, taken: dict[str, Any]) -> str:
    """base, or base_2, base_3, ... when taken (every trained adapter's folder is named linear_spec_lora)."""
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def register_peft(model, peft, name: str) -> None:
    """Adopt a PeftModel built elsewhere (training) so the runtime can switch its adapter."""
    _set_peft(model, peft)
    model.adapters[name] = LoadedAdapter("<training>", trainable=True)
    model.active_adapter = name


def detach_adapter(model, name: str | None = None) -> None:
    """Delete one adapter, or unload PEFT entirely (name None or the last adapter): the base weights come back."""
    peft = peft_of(model)
    if peft is None:
        return
    names = [name] if name is not None else list(model.adapters)
    for n in names:
        if n not in model.adapters:
            raise AdapterError(f"no adapter named {n!r}; loaded: {sorted(model.adapters)}")
    if len(names) == len(model.adapters):
        peft.base_model.unload()
        _set_peft(model, None)
        model.peft_state.base_encoder = None
        model.adapters.clear()
        model.active_adapter = None
        return
    for n in names:
        peft.base_model.delete_adapter(n)
        del model.adapters[n]
    model.active_adapter = next(iter(model.adapters))


def pathway_encoder(model, adapter: str | None, on: bool) -> nn.Module | None:
    """The backbone twin for a forward with adapter `adapter` on or off (see model/pathways.py); None where the
    PEFT-wrapped backbone must run instead (no adapter loaded through attach_adapter, or one that cannot merge)."""
    base = base_encoder(model)
    if base is None or (on and adapter is None):
        return None
    if not on:
        return base
    loaded = model.adapters[adapter]
    if loaded.merged is None:
        loaded.merged = merged_copy(base, model.encoder, adapter) or False
    return loaded.merged or None


def gated_encoder(model, adapter: str) -> tuple[nn.Module | None, TokenGate]:
    """(the gated twin of adapter `adapter` or None where PEFT must run, its gate holder)."""
    loaded = model.adapters[adapter]
    if loaded.gate is None:
        loaded.gate = TokenGate()
    base = base_encoder(model)
    if base is not None and loaded.gated is None:
        loaded.gated = gated_copy(base, model.encoder, adapter, loaded.gate) or False
    return (loaded.gated or None), loaded.gate


def decode_encoders(model) -> list[nn.Module]:
    """Every backbone tree the runtime may run: the PEFT-managed one and the inference twins built so far."""
    twins = [base_encoder(model)] + [t for a in model.adapters.values() for t in (a.merged, a.gated)]
    return [model.encoder] + [t for t in twins if isinstance(t, nn.Module)]


@contextmanager
def lora_enabled(model, adapter: str | None, on: bool) -> Iterator[None]:
    """Run the enclosed forwards with adapter `adapter` on (on=True) or every adapter off."""
    peft = peft_of(model)
    if peft is None or adapter is None:
        yield
        return
    if on:  # enabling makes PEFT mark the active adapter trainable; set_adapter after it restores inference mode
        peft.base_model.enable_adapter_layers()
        peft.base_model.set_adapter(adapter, inference_mode=not model.adapters[adapter].trainable)
    else:
        peft.base_model.disable_adapter_layers()
    try:
        yield
    finally:
        peft.base_model.disable_adapter_layers()


class TokenGate:
    """Forward pre-hook on an adapter's LoRA A matrices: their input times the current per-token gate (None: no
    gate). Installed once per adapter, so compiled forwards see the same hooks every call."""

    def __init__(self) -> None:
        self.gate: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, args: tuple) -> tuple | None:
        return None if self.gate is None else (args[0] * self.gate.to(args[0].dtype),)


def _install_gate_hooks(model, adapter: str, hook: TokenGate) -> None:
    loaded = model.adapters[adapter]
    if not loaded.gate_hooked:
        for _, layer in lora_layers(peft_of(model).base_model.model, adapter):
            layer.lora_A[adapter].register_forward_pre_hook(hook)
        loaded.gate_hooked = True


@contextmanager
def lora_token_gate(model, adapter: str, gate: torch.Tensor) -> Iterator[nn.Module | None]:
    """Run the enclosed forwards with adapter `adapter` on for the tokens where gate (batch, q) is True and off for
    the others; yields the backbone twin to run (model/pathways.py GatedLoRALinear), or None to run the PEFT model,
    whose LoRA A matrices then see their input times the gate. Either way a gated-off token's delta is exactly 0
    and its output equals the base model's bit for bit."""
    encoder, hook = gated_encoder(model, adapter)
    hook.gate = gate[..., None]
    try:
        if encoder is not None:
            yield encoder
        else:
            _install_gate_hooks(model, adapter, hook)
            with lora_enabled(model, adapter, True):
                yield None
    finally:
        hook.gate = None
