"""Random-weight folders in NVIDIA's release layout, for tests, the fixture script and the scale check: a folder
that loads like a downloaded Nemotron-Labs-Diffusion checkpoint (sharded safetensors + index, tokenizer with
chat_template.jinja, generation_config.json, a `linear_spec_lora/` PEFT adapter), of any named shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nld_lora.model.nld_config import backbone_config_from_dict
from nld_lora.model.release import (
    ADAPTER_SUBFOLDER,
    RELEASE_INSTRUCT_EOS,
    RELEASE_MASK_TOKEN_ID,
    SHAPES,
    THINK_TOKENS,
    Shape,
    release_config,
)
from nld_lora.model.trimode import empty_model


def weight_shapes(config_dict: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the NLD layout for this config (built on the meta device: no memory)."""
    skeleton = empty_model(backbone_config_from_dict(config_dict, "config"))
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if "rotary_emb" not in k}


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
                   std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    scale = std * (8.0 if name == "diffusion_head.weight" else 1.0)  # a sharper head: argmax paths are non-trivial
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def write_random_weights(folder: Path, config_dict: dict[str, Any], *, seed: int = 0,
                         shard_bytes: int = 2 * 2**30, min_shards: int = 2) -> int:
    """Sharded safetensors + model.safetensors.index.json, one shard in memory at a time; returns total bytes."""
    dtype = getattr(torch, config_dict.get("dtype") or "float32")
    shapes = weight_shapes(config_dict)
    elem = torch.empty((), dtype=dtype).element_size()
    total = sum(torch.Size(s).numel() for s in shapes.values()) * elem
    shard_bytes = min(shard_bytes, max(total // min_shards + 1, 1))
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * elem
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    std = float(config_dict.get("initializer_range", 0.02))
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: _random_tensor(n, shapes[n], dtype, gen, std) for n in names}
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_release_adapter(folder: Path, config_dict: dict[str, Any], *, r: int = 8, alpha: int = 32,
                          seed: int = 1, base_model: str = "") -> Path:
    """A `linear_spec_lora/` PEFT LoRA on o_proj as NVIDIA ships it (task_type CAUSAL_LM, inference_mode true)."""
    from peft import LoraConfig

    out = folder / ADAPTER_SUBFOLDER
    out.mkdir(parents=True, exist_ok=True)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=["o_proj"], lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", inference_mode=True, base_model_name_or_path=base_model)
    meta = lora.to_dict()
    meta["target_modules"] = ["o_proj"]
    meta["peft_type"] = "LORA"
    meta["task_type"] = "CAUSAL_LM"
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    dtype = getattr(torch, config_dict.get("dtype") or "float32")
    hidden = config_dict["hidden_size"]
    width = config_dict["num_attention_heads"] * config_dict["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config_dict["num_hidden_layers"]):
        key = f"base_model.model.encoder.layers.{layer}.self_attn.o_proj"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(r, width, generator=gen) / width**0.5).to(dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(hidden, r, generator=gen) * 0.05).to(dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def _fixture_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer laid out like Tekken's specials (bos 1, eos 2, [INST] 3, end-of-turn 11, mask 100)."""
    from transformers import PreTrainedTokenizerFast

    from nld_lora.tokenization import train_byte_level_bpe

    specials = [f"<SPECIAL_{i}>" for i in range(RELEASE_MASK_TOKEN_ID + 1)]
    named = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[SYSTEM_PROMPT]",
             6: "[/SYSTEM_PROMPT]", 7: THINK_TOKENS[0], 8: THINK_TOKENS[1], 9: "<pad>",
             RELEASE_INSTRUCT_EOS: "<|im_end|>", RELEASE_MASK_TOKEN_ID: "<|mask|>"}
    for i, tok in named.items():
        specials[i] = tok
    corpus = ["def add(a, b):\n    return a + b\n", "Write a function that reverses a list.",
              "class Stack:\n    def push(self, x):\n        self.items.append(x)\n", "The answer is 42."]
    tok = train_byte_level_bpe(corpus * 20, vocab_size, specials, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<pad>", mask_token="<|mask|>")


FIXTURE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'] }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def write_release_folder(folder: str | Path, shape: str | Shape = "tiny", *, dtype: str = "bfloat16",
                         seed: int = 0, original_max_positions: int | None = None, adapter: bool = True,
                         tokenizer: bool = True, min_shards: int = 2) -> Path:
    """Write a random-weight NLD folder in the release layout; returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape] if isinstance(shape, str) else shape
    tok = _fixture_tokenizer(s.vocab) if tokenizer else None
    vocab = max(len(tok), s.vocab) if tok is not None else s.vocab
    small = s.vocab < 131072
    cfg = release_config(s, vocab_size=vocab, dtype=dtype,
                         original_max_positions=original_max_positions or (64 if small else 16384))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {"bos_token_id": 1, "eos_token_id": [2, RELEASE_INSTRUCT_EOS], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    if tok is not None:
        tok.chat_template = FIXTURE_CHAT_TEMPLATE
        tok.save_pretrained(str(out))
    write_random_weights(out, cfg, seed=seed, min_shards=min_shards)
    if adapter:
        rank = min(128, max(4, s.hidden // 16))  # the release's r 128 at 8B width, scaled down
        write_release_adapter(out, cfg, seed=seed + 1, r=rank, alpha=4 * rank)
    return out
