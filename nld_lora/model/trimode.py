"""TriModeModel: one backbone + one untied head serving AR, block-diffusion and self-speculative decoding."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from nld_lora.adapter import attach as lora
from nld_lora.model.nld_config import apply_nld_defaults, validate_mask_token
from nld_lora.model.saving import save_checkpoint

if TYPE_CHECKING:
    from nld_lora.decoding.api import GenerationResult


class TriModeModel(nn.Module):
    """NLD layout: the backbone under `encoder.`, the LM head as a separate `diffusion_head`.

    The modes share every weight; only the attention mask passed to `forward` changes.
    """

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = apply_nld_defaults(config)
        self.encoder = AutoModel.from_config(config, attn_implementation="sdpa")
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # transformers renamed the backbone's `past_key_values` argument to `cache` (5.2x); accept both
        params = inspect.signature(self.encoder.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.tokenizer: Any = None
        self.name_or_path: str = ""
        self.weights_hash: str = ""
        self.source_folder: str = ""  # the folder it was loaded from (release files are carried on save)
        self.source_config: dict[str, Any] = {}  # that folder's config.json as written
        self.extra_eos_ids: set[int] = set()  # stop ids from generation_config.json / the tokenizer
        self.adapters: dict[str, lora.LoadedAdapter] = {}  # name -> folder, lora_mode, metadata
        self.peft_state = lora.PeftState()  # the PeftModel and the adapter-off twin, outside the module tree
        self.active_adapter: str | None = None
        self.quantization: str | None = None  # "4bit" / "8bit" when the backbone's Linears are bitsandbytes layers

    @property
    def mask_token_id(self) -> int:
        return int(self.config.mask_token_id)

    @property
    def block_size(self) -> int:
        return int(self.config.block_size)

    @property
    def device(self) -> torch.device:
        return self.diffusion_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2**31))

    @property
    def eos_token_ids(self) -> set[int]:
        """Stop on any of these: config.json's eos_token_id (int or list) plus generation_config / tokenizer ones."""
        eos = getattr(self.config, "eos_token_id", None)
        ids = set(self.extra_eos_ids)
        if eos is not None:
            ids |= {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}
        return ids

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        logits_index: torch.Tensor | slice | None = None,
        encoder: nn.Module | None = None,
        eager: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Run the backbone with an explicit 4D mask and positions; return (logits, cache).

        logits_index selects query positions before the head (saves the vocab projection elsewhere).
        encoder: an inference twin of the backbone (adapter/layers.py) to run instead of `self.encoder`.
        eager: call the backbone's forward directly, past a torch.compile wrapper (nn.Module.compile) if any.
        """
        backbone = encoder or self.encoder
        out = (backbone._call_impl if eager else backbone)(  # _call_impl: nn.Module.__call__ minus the compiled wrapper
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_arg: cache},
        )
        hidden = out.last_hidden_state
        if logits_index is not None:
            hidden = hidden[:, logits_index] if isinstance(logits_index, slice) else _gather_rows(hidden, logits_index)
        return self.diffusion_head(hidden), cache

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Present so that plain PEFT can wrap this model for a CAUSAL_LM adapter (NVIDIA's task_type); decoding
        always goes through `generate(mode=...)`, never transformers' generation loop."""
        raise NotImplementedError("TriModeModel decodes with .generate(mode='ar'|'diffusion'|'self_spec')")

    def save_pretrained(self, path: str) -> None:
        """Write config.json + model.safetensors (+ tokenizer) in the NLD layout."""
        save_checkpoint(self, path)

    def generate(self, prompts_or_ids: Any, **kwargs: Any) -> GenerationResult:
        """Decode with mode="ar" | "diffusion" | "self_spec"; see nld_lora.decoding.api.generate."""
        from nld_lora.decoding.api import generate

        return generate(self, prompts_or_ids, **kwargs)

    def attach_adapter(self, path: str, *, name: str | None = None, lora_mode: str | None = None,
                       other_base: bool = False) -> str:
        """Load a PEFT LoRA folder (a path, or a subfolder of the model's folder such as a release's
        "linear_spec_lora"); it becomes the active adapter. lora_mode defaults to the adapter's metadata, else
        "draft_only"; other_base attaches one trained on other base weights. Returns its name."""
        return lora.attach_adapter(self, path, name=name, lora_mode=lora_mode, other_base=other_base)

    def detach_adapter(self, name: str | None = None) -> None:
        """Remove one adapter (or all when name is None), restoring the base weights' behaviour."""
        lora.detach_adapter(self, name)

    def adapter_enabled(self, name: str | None, on: bool):
        """Context manager: the enclosed forwards run with adapter `name` on, or with every adapter off."""
        return lora.lora_enabled(self, name, on)


def _gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden (B, Q, H), index (B, K) -> (B, K, H)."""
    return torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))


def empty_model(config: Any) -> TriModeModel:
    """The model skeleton on the meta device (rotary buffers stay real): no memory, no random init."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return TriModeModel(config)


def new_model(config: Any) -> TriModeModel:
    """A freshly initialised tri-mode model (for pretraining or tests); config must carry mask_token_id."""
    apply_nld_defaults(config)
    validate_mask_token(config, "config")
    return TriModeModel(config)
