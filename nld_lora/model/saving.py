"""Saving a tri-mode model in the NLD layout (ours, or NVIDIA's release layout with its identity fields)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nld_lora.model.nld_config import CheckpointError
from nld_lora.model.release import (
    NLD_ARCHITECTURE,
    RELEASE_ARCHITECTURE,
    RELEASE_AUTO_MAP,
    RELEASE_IDENTITY_KEYS,
    RELEASE_KEPT_FILES,
    RELEASE_MODEL_TYPE,
)

if TYPE_CHECKING:
    from nld_lora.model.trimode import TriModeModel


def saved_config(model: TriModeModel, *, release_layout: bool = False) -> dict[str, Any]:
    """config.json for a save: the release's identity fields when the model came from one (or release_layout asks
    for them: model_type, architectures and auto_map of NVIDIA's remote code), else ours."""
    config = model.config.to_dict()
    source = getattr(model, "source_config", None) or {}
    if source.get("model_type") == RELEASE_MODEL_TYPE:
        for key in RELEASE_IDENTITY_KEYS:
            if key in source:
                config[key] = source[key]
    elif release_layout:
        config.update(model_type=RELEASE_MODEL_TYPE, architectures=[RELEASE_ARCHITECTURE],
                      auto_map=dict(RELEASE_AUTO_MAP))
    else:
        config["architectures"] = [NLD_ARCHITECTURE]
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    return config


def save_checkpoint(model: TriModeModel, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    release_layout: bool = False) -> None:
    """Write the NLD layout: shards (+ index when several) staged then moved in, config, tokenizer, and from a
    release folder its remote-code files and generation_config.json, so NVIDIA's loader still opens it.
    release_layout: write NVIDIA's config identity (model_type nemotron_labs_diffusion, auto_map) also for a model
    that did not come from a release folder."""
    if any("lora_" in k or ".base_layer." in k for k in model.state_dict()):
        raise CheckpointError(f"cannot save {model.name_or_path or 'the model'} with adapters attached "
                              f"({sorted(model.adapters)}): detach_adapter() first; adapters are saved as their "
                              "own folders (nld-lora export --adapter A --into MODEL_DIR)")
    from huggingface_hub import save_torch_state_dict

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / ".saving"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if "rotary_emb" not in k}
    save_torch_state_dict(state, stage, max_shard_size=max_shard_size, metadata={"format": "pt"})
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        if not (stage / old.name).exists():
            old.unlink()
    for new in stage.iterdir():
        os.replace(new, out / new.name)
    stage.rmdir()
    config = saved_config(model, release_layout=release_layout)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source = Path(getattr(model, "source_folder", "") or "")
    if source.is_dir() and source.resolve() != out.resolve():
        for f in [*source.glob("*.py"), *(source / n for n in RELEASE_KEPT_FILES)]:
            if f.exists():
                shutil.copy2(f, out / f.name)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
