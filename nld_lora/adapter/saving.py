"""Saving a trained adapter (PEFT folder + nld_adapter.json, NVIDIA's adapter_config fields) and installing it
into a model folder as linear_spec_lora/, where NVIDIA's loader and SGLang look for it."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from nld_lora.adapter.attach import TRAINING_ADAPTER as ADAPTER_NAME
from nld_lora.adapter.meta import META_FILE, AdapterMeta
from nld_lora.config_io import to_dict

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", META_FILE, "README.md")


def adapter_state(peft_model: Any, adapter: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors (and retrained token rows) under PEFT's names, as plain CPU tensors. Collective
    (every rank calls it): sharded FSDP parameters (DTensors) are gathered in full. Selected by name, because PEFT
    clears requires_grad while the adapter is disabled."""
    state = {}
    for name, param in peft_model.named_parameters():
        if (".lora_" in name and f".{adapter}." in name) or name.endswith(f".trainable_tokens_delta.{adapter}"):
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[name] = full.detach().cpu().clone()
    if not state:
        raise RuntimeError(f"the model carries no LoRA tensors of adapter {adapter!r}; nothing to save")
    return state


def save_adapter(peft_model, out: Path, model, cfg: Any, draft_len: int, extra: dict[str, Any],
                 state: dict[str, torch.Tensor] | None = None, adapter: str = ADAPTER_NAME) -> None:
    """PEFT folder + nld_adapter.json (base fingerprint, lora_mode, draft_len, the training config `cfg`), written
    via a temp folder. state: the adapter tensors from adapter_state (needed when the model is sharded)."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), selected_adapters=[adapter], state_dict=state)
    src = tmp / adapter if (tmp / adapter).is_dir() else tmp
    release_style_config(src / "adapter_config.json", model.name_or_path)
    AdapterMeta(base_model=model.name_or_path, base_weights_hash=model.weights_hash, lora_mode="draft_only",
                draft_len=draft_len, draft_layout=cfg.draft_layout, block_size=model.block_size,
                base_quantization=model.quantization, train_config=to_dict(cfg), **extra).write(src)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(src, out)
    shutil.rmtree(tmp, ignore_errors=True)


def release_style_config(path: Path, base_model: str) -> None:
    """Write adapter_config.json as NVIDIA's `linear_spec_lora/` has it (task_type CAUSAL_LM, inference_mode true),
    so the trained adapter can replace the released one; the runtime loads either way."""
    config = json.loads(path.read_text())
    config.update(task_type="CAUSAL_LM", inference_mode=True, base_model_name_or_path=base_model)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_adapter(adapter: str | os.PathLike, model_dir: str | os.PathLike) -> Path:
    """Put a trained adapter at MODEL_DIR/linear_spec_lora (where NVIDIA's loader and SGLang look for it).

    The adapter is checked against the model's modules first; an adapter already there is moved aside to
    `linear_spec_lora.previous-<time>` (never deleted). Returns the new adapter folder.
    """
    from nld_lora.adapter.attach import AdapterError, check_adapter_matches
    from nld_lora.model.checkpoint import load_skeleton
    from nld_lora.model.nld_config import CheckpointError
    from nld_lora.model.release import ADAPTER_SUBFOLDER

    src, dest_root = Path(adapter), Path(model_dir)
    if not dest_root.is_dir():
        raise CheckpointError(f"{dest_root}: no such model folder")
    try:
        check_adapter_matches(load_skeleton(str(dest_root)), src)
    except AdapterError as err:
        raise CheckpointError(f"cannot export into {dest_root}: {err}") from err
    dest = dest_root / ADAPTER_SUBFOLDER
    stage = dest_root / f".{ADAPTER_SUBFOLDER}.incoming"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    for name in ADAPTER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, stage / name)
    if dest.exists():
        os.replace(dest, dest_root / f"{ADAPTER_SUBFOLDER}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(stage, dest)
    return dest
