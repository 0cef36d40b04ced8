"""Exports of a tri-mode checkpoint: a plain causal-LM "AR view" and NVIDIA's release layout.

The AR view lets AR-only engines (vLLM, transformers' generate) serve the AR pathway of an NLD folder without
its remote code, which could otherwise decode in a diffusion mode: `encoder.*` -> `model.*`,
`diffusion_head` -> `lm_head`, config `ministral3` / `Ministral3ForCausalLM`, same tokenizer and chat template.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from nld_lora.model.checkpoint import (
    open_weights,
    read_config,
    read_tensor,
    resolve_folder,
    weight_files,
    weights_fingerprint,
)
from nld_lora.model.nld_config import CheckpointError
from nld_lora.model.release import (
    AR_VIEW_ARCHITECTURE,
    NLD_ONLY_FIELDS,
    REMOTE_CODE_FILES,
    TOKENIZER_FILES,
)

AR_VIEW_STAMP = "nld_ar_view.json"  # which source (weights fingerprint + config) an AR view folder was made from


def ar_view_config(config: dict) -> dict:
    """The checkpoint's config as a plain Ministral3 causal LM (NLD-only fields dropped).

    The Llama-4 query scaling is also written as the top-level `llama_4_scaling` key ({beta,
    original_max_position_embeddings}) that vLLM's Mistral/Ministral3 model reads; transformers reads it from
    `rope_parameters`. Without it vLLM decodes a different model past original_max_position_embeddings."""
    out = {k: v for k, v in config.items() if k not in NLD_ONLY_FIELDS}
    out["model_type"] = "ministral3"
    out["architectures"] = [AR_VIEW_ARCHITECTURE]
    out["tie_word_embeddings"] = False
    rope = config.get("rope_parameters") or {}
    if rope.get("llama_4_scaling_beta") is not None:
        original = rope.get("original_max_position_embeddings", config.get("max_position_embeddings"))
        out["llama_4_scaling"] = {"beta": rope["llama_4_scaling_beta"], "original_max_position_embeddings": original}
    return out


def _ar_key(key: str, source: Path) -> str:
    if key.startswith("encoder."):
        return "model." + key[len("encoder."):]
    if key == "diffusion_head.weight":
        return "lm_head.weight"
    raise CheckpointError(f"{source}: tensor {key!r} is not in the NLD layout (encoder.* / diffusion_head)")


def export_ar_view(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, reuse: bool = True) -> Path:
    """Write the AR view of an NLD folder, shard by shard (one shard in memory at a time). Returns out_dir.

    reuse: keep an AR view already in out_dir that was made from the same weights and config (16 GB at 8B)."""
    src = resolve_folder(str(model_dir))
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the AR view must go to another folder than the model")
    files = weight_files(src)
    config = ar_view_config(read_config(src))
    stamp = {"source": str(src), "weights_hash": weights_fingerprint(files), "config": config}
    stamp_path = out / AR_VIEW_STAMP
    if reuse and stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return out
        except json.JSONDecodeError:
            pass  # a damaged stamp: write the view again
    out.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, f in enumerate(files):
        name = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        with open_weights(f) as handle:
            part = {_ar_key(k, f): read_tensor(handle, k, f) for k in handle.keys()}
        total += sum(t.numel() * t.element_size() for t in part.values())
        save_file(part, str(out / f".{name}.tmp"), metadata={"format": "pt"})
        os.replace(out / f".{name}.tmp", out / name)
        weight_map.update(dict.fromkeys(part, name))
        del part
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    stamp_path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")  # last: marks the view complete
    return out


def export_release_layout(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                          adapter: str | os.PathLike | None = None, wrap: bool = False) -> tuple[Path, list[str]]:
    """Save a model (any folder nld_lora loads) in NVIDIA's release layout, so NVIDIA's own code can open it:
    config with model_type nemotron_labs_diffusion + auto_map, weights under encoder.* / diffusion_head, tokenizer,
    and `adapter` (if given) as linear_spec_lora/. Returns (folder, remote-code files it still lacks: copy them
    from the release repository, they are not part of this project)."""
    from nld_lora.model.checkpoint import load
    from nld_lora.model.saving import save_checkpoint

    out = Path(out_dir)
    if out.exists() and out.resolve() == resolve_folder(str(model_dir)).resolve():
        raise CheckpointError(f"{out}: the release-layout copy must go to another folder than the model")
    save_checkpoint(load(str(model_dir), wrap=wrap), out, release_layout=True)
    if adapter is not None:
        from nld_lora.adapter.saving import export_adapter

        export_adapter(adapter, out)
    return out, [f for f in REMOTE_CODE_FILES if not (out / f).exists()]
