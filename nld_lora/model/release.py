"""NVIDIA's NLD release layout, defined once: model_type and architecture names, remote-code and carried files,
hub download patterns, the NLD-only config fields, the named model shapes and a release config.json.

Random-weight folders in this layout (tests, the scale check) are written by nld_lora.testing.release_fixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RELEASE_MODEL_TYPE = "nemotron_labs_diffusion"
RELEASE_ARCHITECTURE = "NemotronLabsDiffusionModel"
RELEASE_AUTO_MAP = {
    "AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
    "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel",
}
RELEASE_IDENTITY_KEYS = ("model_type", "architectures", "auto_map")
RELEASE_KEPT_FILES = ("generation_config.json",)  # carried over, with the remote code, when a release folder is saved
NLD_ARCHITECTURE = "NemotronLabsDiffusionModel"  # also this project's own folders (with model_type ministral3)
AR_VIEW_ARCHITECTURE = "Ministral3ForCausalLM"  # the AR view: the backbone + head as a plain causal LM
# config fields that only the tri-mode model reads (dropped from the AR view)
NLD_ONLY_FIELDS = ("auto_map", "mask_token_id", "dlm_paradigm", "block_size", "dlm_loss_weight", "ar_loss_weight",
                   "dp_varying_mask_ratio")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "tekken.json", "generation_config.json")
# NVIDIA's remote code in a release folder: the two files auto_map names, and the Ministral3 fork they import
REMOTE_CODE_FILES = ("configuration_nemotron_labs_diffusion.py", "modeling_nemotron_labs_diffusion.py",
                     "modeling_ministral.py")
ADAPTER_SUBFOLDER = "linear_spec_lora"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "tekken.json", "tokenizer*",
                f"{ADAPTER_SUBFOLDER}/*"]  # what a hub download keeps: weights, tokenizer, template, code, adapter
RELEASE_MASK_TOKEN_ID = 100
RELEASE_INSTRUCT_EOS = 11
THINK_TOKENS = ("[THINK]", "[/THINK]")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 131072


# 3b/8b: the released shapes (model cards); 1b: the 3B's layer shape scaled down to run on a CPU; tiny: for tests.
SHAPES: dict[str, Shape] = {
    "tiny": Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=512),
    "1b": Shape(layers=12, hidden=2048, intermediate=6144, heads=16, kv_heads=8, head_dim=128),
    "3b": Shape(layers=26, hidden=3072, intermediate=9216, heads=32, kv_heads=8, head_dim=128),
    "8b": Shape(layers=34, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128),
}


def release_config(shape: str | Shape, *, vocab_size: int | None = None, original_max_positions: int = 16384,
                   yarn_factor: float = 16.0, dtype: str = "bfloat16", eos_token_id: int = RELEASE_INSTRUCT_EOS,
                   mask_token_id: int = RELEASE_MASK_TOKEN_ID, block_size: int = 32) -> dict[str, Any]:
    """config.json of a released NLD model (8B's fields) with the given shape; smaller positions for tests."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    max_positions = int(original_max_positions * yarn_factor)
    return {
        "model_type": RELEASE_MODEL_TYPE,
        "architectures": [RELEASE_ARCHITECTURE],
        "auto_map": dict(RELEASE_AUTO_MAP),
        "vocab_size": vocab_size or s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "use_cache": False,
        "pad_token_id": None,
        "bos_token_id": 1,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 1000000.0, "factor": yarn_factor,
            "original_max_position_embeddings": original_max_positions, "max_position_embeddings": max_positions,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "sliding_window": None,
        "mask_token_id": mask_token_id,
        "dlm_paradigm": "bidirectional",
        "block_size": block_size,
        "dlm_loss_weight": None,
        "ar_loss_weight": 1.0,
        "dp_varying_mask_ratio": False,
        "dtype": dtype,
    }
