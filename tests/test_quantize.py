"""QLoRA on CPU: bitsandbytes NF4 / int8 backbones through transformers' integration, LoRA gradients after eval
forwards, training on the quantized base, adapters that draft losslessly on the full-precision model."""

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

import nld_lora
from nld_lora.adapter.attach import add_lora
from nld_lora.model.quantize import quantized_twin
from nld_lora.train import LoraSettings, TrainConfig, train
from tests.helpers import EMBEDDED

PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, item):\n", "import os\n\n\ndef walk(path):\n"]


def test_twin_quantizes_backbone_linears_and_leaves_the_model_alone():
    model = nld_lora.load(EMBEDDED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = quantized_twin(model, "4bit")
    linears = [m for m in twin.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert type(twin.diffusion_head) is torch.nn.Linear and twin.diffusion_head.weight.dtype == torch.float32
    assert twin.quantization == "4bit" and model.quantization is None
    assert all(type(m) is torch.nn.Linear for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # NF4 weights dequantize close to the originals (an independent check of what was stored)
    q = twin.encoder.layers[0].mlp.up_proj.weight
    deq = bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
    ref = model.encoder.layers[0].mlp.up_proj.weight
    assert deq.shape == ref.shape and (deq - ref).abs().mean() < 0.1 * ref.abs().mean()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_model_decodes_every_mode(quantization):
    """NF4 dequantizes weights only, so greedy self-speculation equals AR on a 4-bit base too; LLM.int8 picks its
    outlier columns from all tokens of a forward, so an 8-bit base's output depends on the forward's width."""
    model = nld_lora.load(EMBEDDED, quantization=quantization)
    ar = model.generate(PROMPTS, mode="ar", max_new_tokens=24)
    spec = model.generate(PROMPTS, mode="self_spec", max_new_tokens=24)
    assert all(len(s) == 24 or model.tokenizer.eos_token_id in s for s in spec.sequences)
    if quantization == "4bit":
        assert spec.sequences == ar.sequences
    assert all(len(s) > 0 for s in model.generate(PROMPTS, mode="diffusion", max_new_tokens=16).sequences)


def test_lora_gradients_survive_an_eval_mode_forward():
    """bitsandbytes repacks NF4 weights for its AVX512-BF16 CPU kernel on an eval-mode no-grad forward, after which
    training forwards give no input gradients; the trainer's eval steps run exactly such forwards."""
    model = quantized_twin(nld_lora.load(EMBEDDED), "4bit")
    peft_model = add_lora(model, TrainConfig(lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "o_proj"])))
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    pos = torch.arange(12)[None].expand(2, -1)
    peft_model.eval()
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos)
    peft_model.train()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    logits, _ = model(ids, attention_mask=mask, position_ids=pos)
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    layer0_q = [g for n, g in grads.items() if "layers.0.self_attn.q_proj.lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), "no LoRA gradient"
    assert layer0_q  # layer 0 is among them: its gradient had to pass every quantized layer above it


@pytest.mark.slow
def test_qlora_training_lowers_loss_and_its_adapter_drafts_losslessly(collected, tmp_path):
    model = nld_lora.load(EMBEDDED)
    cfg = TrainConfig(lora=LoraSettings(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                      steps=30, batch_size=8, eval_every=30, save_every=30, log_every=3, lr=2e-3,
                      eval_fraction=0.25, quantization="4bit", fit_eval=False)
    res = train(model, collected, tmp_path / "t", cfg, progress=False)
    assert model.quantization is None and model.adapters == {}  # the caller's model is untouched
    log = [json.loads(line) for line in (tmp_path / "t" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    meta = json.loads((Path(res.adapter_dir) / "nld_adapter.json").read_text())
    assert meta["base_quantization"] == "4bit"
    model.attach_adapter(res.adapter_dir)
    ar = model.generate(PROMPTS, mode="ar", adapter=False, max_new_tokens=32)
    spec = model.generate(PROMPTS, mode="self_spec", max_new_tokens=32)
    assert spec.sequences == ar.sequences
    model.detach_adapter()
    base = model.generate(PROMPTS, mode="self_spec", max_new_tokens=32)
    assert spec.stats.acceptance_lengths != base.stats.acceptance_lengths  # the adapter changes the drafts


def test_an_unquantized_model_never_imports_bitsandbytes(tmp_path):
    """Training, saving and attaching a LoRA on a full-precision model leaves bitsandbytes unimported (its import
    prints a warning and reaches for a hub kernel), and prints nothing about it."""
    import subprocess
    import sys

    script = f"""
import sys
import nld_lora
from nld_lora.adapter.attach import add_lora
from nld_lora.adapter.saving import save_adapter
from nld_lora.train import LoraSettings, TrainConfig
model = nld_lora.load({EMBEDDED!r})
cfg = TrainConfig(lora=LoraSettings(r=4, alpha=8))
save_adapter(add_lora(model, cfg), __import__("pathlib").Path({str(tmp_path / "a")!r}), model, cfg, 3, {{}})
model.detach_adapter()
model.attach_adapter({str(tmp_path / "a")!r})
model.generate(["def f(x):"], mode="self_spec", max_new_tokens=4)
print("bitsandbytes" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert "bitsandbytes" not in done.stderr and "kernels" not in done.stderr
