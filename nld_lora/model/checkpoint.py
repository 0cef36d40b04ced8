"""Checkpoint I/O: the NLD layout (encoder.* + diffusion_head), and wrapping plain HF causal LM folders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nld_lora.model.config import (
    NLD_ARCHITECTURE,
    CheckpointError,
    apply_nld_defaults,
    backbone_config_from_dict,
    validate_mask_token,
)
from nld_lora.model.trimode import TriModeModel

MASK_TOKEN = "<|mask|>"
_FULL_HASH_LIMIT = 512 * 2**20


def resolve_folder(name_or_path: str) -> Path:
    """A local folder, or a hub snapshot when the name looks like 'org/model' and the hub is reachable."""
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file, expected a checkpoint folder")
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as err:
            raise CheckpointError(f"{name_or_path}: not a local folder and the hub download failed: {err}") from err
    raise CheckpointError(f"{name_or_path}: no such checkpoint folder")


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{folder}: not a checkpoint (no model.safetensors or model.safetensors.index.json)")


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    return state


def weights_fingerprint(files: list[Path]) -> str:
    """sha256 over the weight files (whole files up to 512 MiB; above that: size, header and both ends)."""
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as handle:
            if size <= _FULL_HASH_LIMIT:
                digest.update(handle.read())
            else:
                digest.update(handle.read(16 * 2**20))
                handle.seek(size - 16 * 2**20)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _is_nld_layout(state: dict[str, torch.Tensor]) -> bool:
    return "diffusion_head.weight" in state and any(k.startswith("encoder.") for k in state)


def _check_and_load(model: TriModeModel, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    problems = []
    for key, tensor in state.items():
        if key not in expected:
            problems.append(f"unexpected tensor {key!r}")
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            problems.append(f"{key}: shape {tuple(tensor.shape)} in file, model expects {tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in state and "rotary_emb" not in k]
    problems += [f"missing tensor {k!r}" for k in missing]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise CheckpointError(f"{source}: weights do not match the config: {shown}")
    model.load_state_dict(state, strict=False)


def _wrap_plain_causal_lm(
    config: Any, state: dict[str, torch.Tensor], tokenizer: Any, source: str,
    prefix: str = "model.", head_key: str = "lm_head.weight",
) -> tuple[TriModeModel, dict[str, torch.Tensor]]:
    """Map {prefix}* -> encoder.*, the head -> diffusion_head (untied copy), add a mask token row.

    Serves plain causal LMs (model.*, lm_head) and NLD-layout folders that lack a mask token (encoder.*, diffusion_head).
    """
    if not any(k.startswith(prefix) for k in state):
        raise CheckpointError(f"{source}: neither NLD layout (encoder.*, diffusion_head) nor a causal LM (model.*)")
    mapped = {"encoder." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    embed = mapped["encoder.embed_tokens.weight"]
    head = state.get(head_key, embed).clone()
    rows = embed.shape[0]
    used = len(tokenizer) if tokenizer is not None else rows
    if tokenizer is not None and MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN) if tokenizer is not None else rows
    if mask_id >= rows:
        embed = torch.cat([embed, embed.mean(0, keepdim=True)])
        head = torch.cat([head, head.mean(0, keepdim=True)])
        config.vocab_size = rows = embed.shape[0]
    else:
        embed = embed.clone()
        embed[mask_id] = embed[:used].mean(0)
        head[mask_id] = head[:used].mean(0)
    mapped["encoder.embed_tokens.weight"] = embed
    mapped["diffusion_head.weight"] = head
    config.mask_token_id = int(mask_id)
    config.tie_word_embeddings = False
    return TriModeModel(config), mapped


def load(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantization: str | None = None,
    wrap: bool = False,
) -> TriModeModel:
    """Load a tri-mode model from an NLD-layout folder, a hub id, or (wrap=True) a plain HF causal LM folder.

    quantization: None, "4bit" or "8bit" (bitsandbytes, CUDA only) for a frozen QLoRA base.
    The tokenizer is attached as `.tokenizer` when the folder has one.
    """
    folder = resolve_folder(name_or_path)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder}: not a checkpoint (no config.json)")
    try:
        config_dict = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    files = weight_files(folder)
    config = backbone_config_from_dict(config_dict, str(config_path))
    state = read_state_dict(files)
    tokenizer = _load_tokenizer(folder)
    if _is_nld_layout(state):
        if wrap and getattr(config, "mask_token_id", None) is None:
            model, state = _wrap_plain_causal_lm(config, state, tokenizer, str(folder), "encoder.",
                                                 "diffusion_head.weight")
        else:
            validate_mask_token(config, str(config_path))
            model = TriModeModel(config)
    elif wrap:
        model, state = _wrap_plain_causal_lm(config, state, tokenizer, str(folder))
    else:
        validate_mask_token(config, str(config_path))
        raise CheckpointError(f"{folder}: weights are not in the NLD layout; pass wrap=True to convert a causal LM")
    validate_mask_token(model.config, str(config_path))
    _check_and_load(model, state, str(folder))
    model.tokenizer = tokenizer
    model.name_or_path = str(name_or_path)
    model.weights_hash = weights_fingerprint(files)
    if dtype is not None:
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if quantization is not None:
        from nld_lora.model.quantize import quantize_frozen_base

        quantize_frozen_base(model, quantization)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def save_checkpoint(model: TriModeModel, path: str | os.PathLike) -> None:
    """Write the NLD layout atomically enough for our use: weights then config, tokenizer when attached."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if "rotary_emb" not in k}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    config = model.config.to_dict()
    config["architectures"] = [NLD_ARCHITECTURE]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))


def new_model(config: Any) -> TriModeModel:
    """A freshly initialised tri-mode model (for pretraining or tests); config must carry mask_token_id."""
    apply_nld_defaults(config)
    validate_mask_token(config, "config")
    return TriModeModel(config)
