"""Tiny random tri-mode models for tests (built in code, seconds to run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Ministral3Config

from nld_lora.model import new_model

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = str(ROOT / "data" / "tiny-nld-code")


def load_script(name: str):
    """scripts/<name>.py imported as a module (the scripts are not a package), for tests of their functions."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_two_processes(*cli_args: str) -> subprocess.CompletedProcess:
    """`nld-lora ...` under a 2-process gloo launch (free rendezvous port), output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nld_lora.cli", *cli_args]
    return subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, cwd=ROOT)


def rank_errors(stderr: str) -> str:
    """The ranks' own error lines (the launcher's summary alone hides why a rank died)."""
    keys = ("Error", "error", "terminate", "what()", "Traceback", "Abort")
    return "\n".join(line for line in stderr.splitlines() if any(k in line for k in keys))[-4000:]


def tiny_rope(max_pos: int = 256) -> dict:
    return {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0, "original_max_position_embeddings": max_pos,
        "max_position_embeddings": max_pos, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
        "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
    }


def tiny_config(vocab: int = 97, block_size: int = 4, layers: int = 2, **kw) -> Ministral3Config:
    return Ministral3Config(
        rope_parameters=tiny_rope(),
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=0, block_size=block_size, **kw,
    )


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = new_model(tiny_config(**kw))
    with torch.no_grad():  # random init is near-uniform; sharpen so argmax paths are non-trivial
        model.diffusion_head.weight.mul_(8.0)
    return model.eval()


def make_adapter(model, path, *, r: int = 4, seed: int = 0, target_modules=("o_proj",)) -> str:
    """Save a random (non-zero) PEFT LoRA for a copy of `model` to `path`; the model itself is untouched."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules),
                                         init_lora_weights=False),
    )
    peft_model.save_pretrained(str(path))
    return str(path)


@torch.no_grad()
def pathway_outputs(model, adapter: str, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> dict:
    """Logits of one forward four ways: through PEFT with the adapter off and on, and through the runtime's base
    and merged twins (what tests compare to check the twins reproduce PEFT)."""
    from nld_lora.adapter.attach import lora_enabled
    from nld_lora.adapter.twins import pathway_encoder

    out = {}
    for label, on in (("off", False), ("on", True)):
        with lora_enabled(model, adapter, on):
            out[label] = model(ids, attention_mask=mask, position_ids=pos)[0]
    for label, on in (("base", False), ("merged", True)):
        out[label] = model(ids, attention_mask=mask, position_ids=pos, encoder=pathway_encoder(model, adapter, on))[0]
    return out


def random_prompts(n: int, vocab: int = 90, lo: int = 3, hi: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [torch.randint(1, vocab, (int(k),), generator=g).tolist() for k in lengths]


def tiny_tokenizer(vocab: int = 300):
    """A byte-level BPE tokenizer trained in-process (pad/eos/mask specials at ids 0/1/2)."""
    from transformers import PreTrainedTokenizerFast

    from nld_lora.tokenization import train_byte_level_bpe

    text = ["def add(a, b):\n    return a + b\n", "class Stack:\n    def push(self, x):\n        self.items.append(x)\n"]
    tok = train_byte_level_bpe(text * 20, vocab, ["<pad>", "<eos>", "<|mask|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", mask_token="<|mask|>")


def tiny_model_with_tokenizer(seed: int = 0):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(vocab=len(tok))
    cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id = 2, 1, 0
    model = new_model(cfg)
    with torch.no_grad():
        model.diffusion_head.weight.mul_(8.0)
    model.tokenizer = tok
    return model.eval()


def saved_tiny_model(path, seed: int = 0) -> str:
    """Save a tiny model with tokenizer and return its folder (loadable with nld_lora.load)."""
    tiny_model_with_tokenizer(seed).save_pretrained(str(path))
    return str(path)


def fsdp_check_config():
    """The training settings of the FSDP2 check (tests/fsdp_worker.py and its single-process reference)."""
    from nld_lora.train import LoraSettings, TrainConfig

    return TrainConfig(lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "o_proj"]), draft_len=7,
                       eval_fraction=0.25, eval_max_seqs=24, eval_blocks_per_seq=8, seed=0)


def fsdp_check_inputs(rank: int) -> dict:
    """Rank `rank`'s batch for the FSDP2 check's training step (a causal forward over 2 x 12 tokens)."""
    ids = torch.arange(3, 3 + 24).reshape(2, 12) + 10 * rank
    return {"input_ids": ids, "attention_mask": torch.ones(2, 1, 12, 12, dtype=torch.bool).tril(),
            "position_ids": torch.arange(12)[None].expand(2, -1)}


def skip_without_sandbox() -> None:
    """Skip where bubblewrap is not usable, unless NLD_REQUIRE_SANDBOX=1 (CI) makes that a failure."""
    from nld_lora.evaluation.sandbox import isolation

    if isolation().bwrap is None:
        if os.environ.get("NLD_REQUIRE_SANDBOX") == "1":
            pytest.fail("NLD_REQUIRE_SANDBOX=1 but bubblewrap is not usable here", pytrace=False)
        pytest.skip("bubblewrap is not installed (scripts/test.sh installs it where it can)")
