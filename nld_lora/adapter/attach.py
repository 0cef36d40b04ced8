"""PEFT LoRA adapters owned by a TriModeModel: attach/detach, per-adapter lora_mode, on/off switching per forward.

lora_mode "draft_only" (NLD's deployment): the adapter is ON for draft/denoise forwards and OFF for prefill, AR,
verify and commit forwards, so AR output is untouched. "both": ON for every forward (output then differs from AR).
A forward that verifies and drafts at once (single-forward self-speculation) gates the adapter per token instead
(nld_lora/adapter/twins.py, with the runtime's inference twins of the backbone).
An adapter folder may carry nld_adapter.json (written by the trainer); its lora_mode and draft_len are the defaults.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from nld_lora.adapter.meta import LORA_MODES, AdapterMeta, AdapterMetaError

TRAINING_ADAPTER = "default"  # the name the trainer's adapter has inside its PeftModel


class AdapterError(ValueError):
    """An adapter folder that does not fit the model."""


_SERIALS = itertools.count()


@dataclass
class LoadedAdapter:
    """One adapter on the model: where it came from, when it is on, and its nld_adapter.json."""

    path: str
    lora_mode: str = "draft_only"
    meta: AdapterMeta = field(default_factory=AdapterMeta)
    trainable: bool = False  # the trainer's adapter; loaded ones stay in inference mode (no gradients)
    serial: int = field(default_factory=lambda: next(_SERIALS))  # unique per attach (decode state keys on it)


def check_lora_mode(lora_mode: str) -> str:
    if lora_mode not in LORA_MODES:
        raise AdapterError(f"lora_mode={lora_mode!r}; expected one of {LORA_MODES}")
    return lora_mode


@dataclass
class PeftState:
    """What attaching adapters adds to a model, held outside its module tree (a plain object, so nn.Module does
    not register it: the PeftModel wraps the model, and registering it would make the model contain itself)."""

    peft: Any = None  # the PeftModel wrapping the model


@contextmanager
def without_bitsandbytes(model) -> Iterator[None]:
    """PEFT without its bitsandbytes layer dispatchers while it wraps an unquantized model. PEFT imports
    bitsandbytes whenever it is installed, and that import prints a warning and reaches for a hub kernel; a model
    without quantized layers has nothing for those dispatchers to match, so the result is the same."""
    if getattr(model, "quantization", None) is not None:
        yield
        return
    import peft.tuners.lora.model as lora_model

    saved = lora_model.is_bnb_available, lora_model.is_bnb_4bit_available
    lora_model.is_bnb_available = lora_model.is_bnb_4bit_available = lambda: False
    try:
        yield
    finally:
        lora_model.is_bnb_available, lora_model.is_bnb_4bit_available = saved


def peft_of(model) -> Any:
    """The PeftModel wrapping `model`, or None."""
    return model.peft_state.peft


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
        adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        rank = None if adapter_config.get("rank_pattern") else adapter_config.get("r")  # one rank for all
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise AdapterError(f"{folder / 'adapter_config.json'}: not a JSON object ({err})") from err
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
            if isinstance(rank, int) and len(shape) == 2 and shape[0 if ".lora_A." in key else 1] != rank:
                raise AdapterError(f"{folder / 'adapter_config.json'}: r={rank}, but {name}'s LoRA weights have "
                                   f"rank {shape[0 if '.lora_A.' in key else 1]} (adapter shape {shape})")
            if ".lora_A." in key and shape[1] != module.in_features:
                raise AdapterError(f"{folder}: {name}: lora_A expects in_features {shape[1]}, "
                                   f"model has {module.in_features} (adapter shape {shape})")
            if ".lora_B." in key and shape[0] != module.out_features:
                raise AdapterError(f"{folder}: {name}: lora_B expects out_features {shape[0]}, "
                                   f"model has {module.out_features} (adapter shape {shape})")


def attach_adapter(model, path: str | Path, *, name: str | None = None, lora_mode: str | None = None,
                   other_base: bool = False) -> str:
    """Load a PEFT folder onto the model (several may be loaded); it becomes the active adapter.

    path may name a subfolder of the model's own folder (a release's "linear_spec_lora"). lora_mode None takes
    the adapter's nld_adapter.json, else "draft_only". An adapter trained on other base weights (its
    nld_adapter.json says which) is refused unless other_base.
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
    own_hash = getattr(model, "weights_hash", None)
    if meta.base_weights_hash and own_hash and meta.base_weights_hash != own_hash and not other_base:
        raise AdapterError(f"{path}: trained on {meta.base_model} (weights {meta.base_weights_hash}), not on these "
                           f"weights ({own_hash}); its drafts would be for another model. Attach it anyway with "
                           "other_base=True (CLI: --adapter-other-base)")
    check_adapter_matches(model, path)
    if name is not None and "." in name:
        raise AdapterError(f"adapter name {name!r}: PEFT module names cannot contain '.'")
    if name is not None and name in model.adapters:
        raise AdapterError(f"an adapter named {name!r} is attached already (from {model.adapters[name].path}); "
                           "detach it first or pick another name")
    name = name or unique_name(Path(path).name.replace(".", "_") or "default", model.adapters)
    peft = peft_of(model)
    if peft is None:
        # Any task_type loads (NVIDIA ships CAUSAL_LM): the runtime drives the model itself, so PEFT's plain
        # wrapper is used instead of a task wrapper that expects transformers' generate hooks.
        config = PeftConfig.from_pretrained(str(path))
        config.task_type = None
        with without_bitsandbytes(model):
            peft = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False, config=config)
        _set_peft(model, peft)
    else:
        with without_bitsandbytes(model):
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
        model.adapters.clear()
        model.active_adapter = None
        return
    for n in names:
        peft.base_model.delete_adapter(n)
        del model.adapters[n]
    model.active_adapter = next(iter(model.adapters))


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


def add_lora(model, cfg: Any):
    """Wrap the model with a trainable PEFT LoRA (cfg: a TrainConfig's lora and train_mask_embedding); unknown
    target modules fail with the model's Linear module names."""
    from peft import LoraConfig, get_peft_model

    from nld_lora.config_io import ConfigError

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in cfg.lora.target_modules if t not in names]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} not in the model; its Linear modules: {sorted(names)}")
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = {"embed_tokens": [model.mask_token_id]} if cfg.train_mask_embedding else None
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
                      target_modules=list(cfg.lora.target_modules), exclude_modules=["diffusion_head"],
                      trainable_token_indices=tokens)
    with without_bitsandbytes(model):
        peft_model = get_peft_model(model, lora, adapter_name=TRAINING_ADAPTER)
    register_peft(model, peft_model, TRAINING_ADAPTER)
    return peft_model
