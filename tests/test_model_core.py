"""Model core: mask equivalences, checkpoint round trips, wrapping, joint loss, and load errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import nld_lora
from nld_lora.model import CheckpointError
from nld_lora.model.loss import joint_loss
from nld_lora.model.masks import causal_mask, draft_mask, dual_stream_mask, dual_stream_positions

ATOL = 1e-5  # fp32 equivalence tolerance: same math, different kernel order (SDPA over cache vs full sequence)


def _plain_causal(model, ids):
    b, n = ids.shape
    valid = torch.ones(b, n, dtype=torch.bool)
    pos = torch.arange(n)[None].expand(b, -1)
    return model(ids, attention_mask=causal_mask(valid, n), position_ids=pos)[0]


def test_clean_half_equals_plain_causal_forward(model):
    ids = torch.randint(0, 90, (2, 12))
    noisy = ids.clone()
    noisy[:, ::3] = model.mask_token_id
    mask = dual_stream_mask(12, model.block_size).expand(2, -1, -1, -1)
    logits, _ = model(torch.cat([noisy, ids], 1), attention_mask=mask, position_ids=dual_stream_positions(12, 2))
    torch.testing.assert_close(logits[:, 12:], _plain_causal(model, ids), atol=ATOL, rtol=0)


def test_noisy_block_equals_draft_forward_over_cache(model):
    block = model.block_size
    ids = torch.randint(0, 90, (2, 12))
    noisy = ids.clone()
    noisy[:, 1::2] = model.mask_token_id
    mask = dual_stream_mask(12, block).expand(2, -1, -1, -1)
    dual, _ = model(torch.cat([noisy, ids], 1), attention_mask=mask, position_ids=dual_stream_positions(12, 2))
    for b in range(12 // block):
        start = b * block
        cache = DynamicCache(config=model.config)
        if start:
            valid = torch.ones(2, start, dtype=torch.bool)
            model(ids[:, :start], attention_mask=causal_mask(valid, start),
                  position_ids=torch.arange(start)[None].expand(2, -1), cache=cache)
        valid = torch.ones(2, start + block, dtype=torch.bool)
        draft, _ = model(noisy[:, start:start + block], attention_mask=draft_mask(valid, block),
                         position_ids=torch.arange(start, start + block)[None].expand(2, -1), cache=cache)
        torch.testing.assert_close(dual[:, start:start + block], draft, atol=ATOL, rtol=0)


def test_save_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    again = nld_lora.load(str(tmp_path / "ckpt"))
    ids = torch.randint(0, 90, (1, 9))
    assert torch.equal(_plain_causal(model, ids), _plain_causal(again, ids))
    assert again.mask_token_id == model.mask_token_id and again.block_size == model.block_size
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["mask_token_id"] == model.mask_token_id and cfg["dlm_paradigm"] == "bidirectional"
    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert "diffusion_head.weight" in keys and "encoder.layers.0.self_attn.o_proj.weight" in keys


def test_plain_llama_folder_wraps_saves_reloads(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    llama = LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="mask_token_id"):
        nld_lora.load(str(tmp_path / "llama"))
    wrapped = nld_lora.load(str(tmp_path / "llama"), wrap=True)
    assert wrapped.mask_token_id == 64 and wrapped.config.vocab_size == 65
    ids = torch.randint(0, 64, (1, 7))
    ref = llama(ids).logits
    torch.testing.assert_close(_plain_causal(wrapped, ids)[..., :64], ref, atol=ATOL, rtol=0)
    wrapped.save_pretrained(tmp_path / "nld")
    again = nld_lora.load(str(tmp_path / "nld"))
    assert torch.equal(_plain_causal(again, ids), _plain_causal(wrapped, ids))


def test_joint_loss_alpha_zero_is_ar_cross_entropy(model):
    ids = torch.randint(0, 90, (3, 12))
    out = joint_loss(model, ids, alpha=0.0, generator=torch.Generator().manual_seed(0))
    logits = _plain_causal(model, ids)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ref, atol=ATOL, rtol=0)


def test_joint_loss_gradients_reach_both_streams(model):
    ids = torch.randint(0, 90, (2, 12))
    embeds = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        embeds.append(output)

    handle = model.encoder.embed_tokens.register_forward_hook(keep)
    out = joint_loss(model, ids, alpha=0.3, per_block=True, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    handle.remove()
    grad = embeds[0].grad
    assert out.n_masked_tokens > 0 and out.diff_loss > 0
    assert grad[:, :12].abs().sum() > 0 and grad[:, 12:].abs().sum() > 0
    model.zero_grad()
    joint_loss(model, ids, alpha=0.0, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert model.diffusion_head.weight.grad.abs().sum() > 0


def test_errors_name_the_problem(model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        nld_lora.load(str(tmp_path / "empty"))
    model.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mask_token_id"] = 500
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="outside the vocabulary"):
        nld_lora.load(str(tmp_path / "m"))
    del cfg["mask_token_id"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no 'mask_token_id'"):
        nld_lora.load(str(tmp_path / "m"))
    cfg["mask_token_id"] = 96
    cfg_path.write_text(json.dumps(cfg))
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state["encoder.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder.layers.1.mlp.up_proj.weight: shape \(3, 3\)"):
        nld_lora.load(str(tmp_path / "m"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        nld_lora.load(str(tmp_path / "nope"))
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="quantization='3bit'"):
        nld_lora.load(str(tmp_path / "ok"), quantization="3bit")
