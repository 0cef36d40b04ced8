"""NLD-specific config fields carried on top of a transformers backbone config."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

NLD_DEFAULTS: dict[str, Any] = {
    "block_size": 32,
    "dlm_paradigm": "bidirectional",
    "ar_loss_weight": 1.0,
    "dp_varying_mask_ratio": False,
}
# Fields whose null is meaningful in NVIDIA's config class (dlm_loss_weight null = weight 1): filled only when absent.
NLD_OPTIONAL: dict[str, Any] = {"dlm_loss_weight": None}
DLM_PARADIGMS = ("bidirectional", "autoregressive", "block_diff")


class CheckpointError(ValueError):
    """A folder, config or weight file that cannot be loaded as a tri-mode checkpoint."""


def backbone_config_from_dict(config_dict: dict[str, Any], source: str) -> PretrainedConfig:
    """Build the backbone config; NLD's own model_type (unknown to transformers) maps to ministral3."""
    d = dict(config_dict)
    model_type = d.pop("model_type", None) or "ministral3"
    for key in ("auto_map", "architectures", "transformers_version"):
        d.pop(key, None)
    if model_type not in CONFIG_MAPPING:
        model_type = "ministral3"
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as err:  # transformers raises several types for bad configs
        raise CheckpointError(f"{source}: cannot build a '{model_type}' config: {err}") from err


def apply_nld_defaults(config: PretrainedConfig) -> PretrainedConfig:
    """Fill the NLD fields a config lacks (mask_token_id excepted: that one must be decided by the caller)."""
    for key, value in NLD_DEFAULTS.items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    for key, value in NLD_OPTIONAL.items():
        if not hasattr(config, key):
            setattr(config, key, value)
    if config.dlm_paradigm not in DLM_PARADIGMS:
        raise CheckpointError(f"config field dlm_paradigm={config.dlm_paradigm!r}; expected one of {DLM_PARADIGMS}")
    return config


def validate_mask_token(config: PretrainedConfig, source: str) -> int:
    """Return mask_token_id, raising a CheckpointError that names the field when it is absent or out of range."""
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        raise CheckpointError(
            f"{source}: config.json has no 'mask_token_id'. A tri-mode model needs one; "
            "pass wrap=True (CLI: --wrap) to add a mask token to a plain causal LM."
        )
    if not isinstance(mask_id, int) or not 0 <= mask_id < config.vocab_size:
        raise CheckpointError(
            f"{source}: config field mask_token_id={mask_id!r} is outside the vocabulary [0, {config.vocab_size})"
        )
    return mask_id
