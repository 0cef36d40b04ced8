"""Checkpoint I/O: NLD-layout folders (ours and NVIDIA's release), wrapping plain HF causal LMs, saving back.

Loading builds the model on the meta device and streams each safetensors shard into it in the target dtype,
so peak host memory stays near one copy of the weights; nothing is initialised randomly first.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nld_lora.model.nld_config import (
    CheckpointError,
    apply_nld_defaults,
    backbone_config_from_dict,
    validate_mask_token,
)
from nld_lora.model.release import HUB_PATTERNS
from nld_lora.model.trimode import TriModeModel, empty_model

MASK_TOKEN = "<|mask|>"
_FULL_HASH_LIMIT = 512 * 2**20
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


EMBEDDED_MODEL = "data/tiny-nld-code"  # the embedded default, found from any working directory
_REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_folder(name_or_path: str) -> Path:
    """A local folder, or a hub snapshot (weights, tokenizer, chat template, remote code, adapter subfolder)."""
    path = Path(name_or_path)
    if not path.exists() and Path(name_or_path) == Path(EMBEDDED_MODEL) and (_REPO_ROOT / EMBEDDED_MODEL).is_dir():
        path = _REPO_ROOT / EMBEDDED_MODEL
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file, expected a checkpoint folder")
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name_or_path, allow_patterns=HUB_PATTERNS))
        except Exception as err:
            raise CheckpointError(f"{name_or_path}: not a local folder and the hub download failed: {err}") from err
    raise CheckpointError(f"{name_or_path}: no such checkpoint folder")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: not a checkpoint (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {err}") from err
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that are not in the folder: {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{folder}: not a checkpoint (no model.safetensors or model.safetensors.index.json)")


@contextmanager
def open_weights(file: Path):
    """safe_open with errors that name the file (a corrupt or truncated download is the usual cause)."""
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as err:  # safetensors raises SafetensorError / OSError for bad headers and short files
        raise CheckpointError(f"{file}: cannot read this safetensors file ({err}); it is corrupt or truncated, "
                              "re-download or re-save it") from err
    with handle:
        yield handle


def read_tensor(handle, key: str, file: Path) -> torch.Tensor:
    """handle.get_tensor with an error that names the file."""
    try:
        return handle.get_tensor(key)
    except Exception as err:
        raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({err}); the file is corrupt or truncated") \
            from err


def weight_shapes_on_disk(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """key -> (shape, safetensors dtype, file), from the headers only."""
    found: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for f in files:
        with open_weights(f) as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                found[key] = (tuple(piece.get_shape()), piece.get_dtype(), f)
    return found


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with open_weights(f) as handle:
            for key in handle.keys():
                state[key] = read_tensor(handle, key, f)
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


def to_torch_dtype(value: Any, field: str = "dtype") -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16; anything else non-float is an error."""
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{field}={value!r}: expected a floating dtype (float32, bfloat16, float16)")
    return dtype


def resolve_dtype(requested: Any, config_dict: dict[str, Any], on_disk: dict[str, tuple], source: str) -> torch.dtype:
    """dtype= wins; else the config's `dtype` / `torch_dtype`; else the weights' stored dtype. Never mixed."""
    if requested is not None:
        return to_torch_dtype(requested)
    for field in ("dtype", "torch_dtype"):
        value = config_dict.get(field)
        if value not in (None, "auto"):
            return to_torch_dtype(value, f"{source}: config field {field}")
    stored = {_SAFETENSORS_DTYPES.get(d) for _, d, _ in on_disk.values()} - {None}
    return stored.pop() if len(stored) == 1 else torch.float32


def _load_tokenizer(folder: Path, config: Any) -> Any:
    """The folder's tokenizer (chat_template.jinja included); the backbone config is passed so that a release's
    auto_map never triggers a remote-code prompt."""
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), config=config, trust_remote_code=False)


def stop_token_ids(folder: Path, tokenizer: Any) -> set[int]:
    """EOS ids a release declares outside config.json: generation_config.json (int or list) and the tokenizer."""
    ids: set[int] = set()
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{gen_path}: invalid JSON at line {err.lineno}: {err.msg}") from err
        if eos is not None:
            ids |= {int(e) for e in eos} if isinstance(eos, list) else {int(eos)}
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _check_shapes(model: TriModeModel, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if "rotary_emb" not in k}
    problems = []
    for key, shape in shapes.items():
        if key not in expected:
            problems.append(f"unexpected tensor {key!r}")
        elif shape != expected[key]:
            problems.append(f"{key}: shape {shape} in file, model expects {expected[key]}")
    problems += [f"missing tensor {k!r}" for k in expected if k not in shapes]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise CheckpointError(f"{source}: weights do not match the config: {shown}")


def _stream_weights(model: TriModeModel, files: list[Path], dtype: torch.dtype) -> None:
    """One shard at a time: read, cast, assign into the meta skeleton (the shard's copy is the model's copy)."""
    for f in files:
        with open_weights(f) as handle:
            part = {k: read_tensor(handle, k, f).to(dtype) for k in handle.keys()}
        model.load_state_dict(part, strict=False, assign=True)
        del part


def _wrap_plain_causal_lm(
    config: Any, state: dict[str, torch.Tensor], tokenizer: Any, source: str,
    prefix: str = "model.", head_key: str = "lm_head.weight",
) -> dict[str, torch.Tensor]:
    """Map {prefix}* -> encoder.*, the head -> diffusion_head (untied copy), add a mask token row (edits config).

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
    return mapped


def check_device(device: torch.device | str) -> torch.device:
    """A device string that torch parses and whose backend is present here, else an error naming it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"device={device!r} is not a device torch knows ({err})") from err
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise CheckpointError(f"device={device!r}: no {parsed.type} device on this machine (use --device cpu)")
    if parsed.index is not None and parsed.index >= backend.device_count():
        raise CheckpointError(f"device={device!r}: this machine has {backend.device_count()} {parsed.type} "
                              "device(s)")
    return parsed


def load(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantization: str | None = None,
    wrap: bool = False,
) -> TriModeModel:
    """Load a tri-mode model from an NLD-layout folder (ours or NVIDIA's release), a hub id, or (wrap=True) a plain
    HF causal LM folder.

    dtype: the whole model's dtype (default: the config's `dtype`, else the stored one). quantization: None, "4bit"
    or "8bit" (bitsandbytes, CPU or CUDA) for a frozen QLoRA base; the head stays in `dtype`. The tokenizer is attached as `.tokenizer`.
    """
    if device is not None:
        device = check_device(device)
    folder = resolve_folder(name_or_path)
    config_dict = read_config(folder)
    config_path = str(folder / "config.json")
    files = weight_files(folder)
    on_disk = weight_shapes_on_disk(files)
    target = resolve_dtype(dtype, config_dict, on_disk, config_path)
    config = backbone_config_from_dict(config_dict, config_path)
    config.dtype = target
    tokenizer = _load_tokenizer(folder, config)
    nld_layout = "diffusion_head.weight" in on_disk and any(k.startswith("encoder.") for k in on_disk)
    needs_mask = getattr(config, "mask_token_id", None) in (None, -1)
    if nld_layout and not (wrap and needs_mask):
        validate_mask_token(config, config_path)
        model = empty_model(config)
        _check_shapes(model, {k: v[0] for k, v in on_disk.items()}, str(folder))
        _stream_weights(model, files, target)
    elif wrap:
        prefix, head = ("encoder.", "diffusion_head.weight") if nld_layout else ("model.", "lm_head.weight")
        state = _wrap_plain_causal_lm(config, read_state_dict(files), tokenizer, str(folder), prefix, head)
        validate_mask_token(config, config_path)
        model = empty_model(config)
        _check_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, str(folder))
        model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=False, assign=True)
    else:
        validate_mask_token(config, config_path)
        raise CheckpointError(f"{folder}: weights are not in the NLD layout; pass wrap=True to convert a causal LM")
    model.tokenizer = tokenizer
    model.name_or_path = str(name_or_path)
    model.source_folder = str(folder)
    model.source_config = config_dict
    model.extra_eos_ids = stop_token_ids(folder, tokenizer)
    model.weights_hash = weights_fingerprint(files)
    if quantization is not None:  # straight onto the device, so the full-precision Linears never go there
        from nld_lora.model.quantize import quantize_frozen_base

        quantize_frozen_base(model, quantization, device=device)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_skeleton(name_or_path: str) -> TriModeModel:
    """The model of a checkpoint folder on the meta device (module names and shapes, no weights read)."""
    folder = resolve_folder(name_or_path)
    config_dict = read_config(folder)
    config = backbone_config_from_dict(config_dict, str(folder / "config.json"))
    apply_nld_defaults(config)
    return empty_model(config)


