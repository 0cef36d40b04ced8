"""YaRN + Llama-4 query scaling past original_max_position_embeddings: batched and multi-block forwards must give
the single-sequence logits (the scale follows each token's position id, not its slot in the cache)."""

import pytest
import torch
from transformers import DynamicCache

from nld_lora.model import new_model
from nld_lora.model.masks import causal_mask, draft_mask
from nld_lora.model.nld_config import backbone_config_from_dict
from nld_lora.model.release import release_config
from nld_lora.train.objective import DraftBatch, student_logits, teacher_pass

ORIGINAL_MAX = 8  # the query scale steps up at positions 8, 16, 24, ...
ATOL = 2e-5


@pytest.fixture(scope="module")
def long_model():
    cfg = backbone_config_from_dict(release_config("tiny", original_max_positions=ORIGINAL_MAX, dtype="float32",
                                                   block_size=4, vocab_size=97, mask_token_id=96), "test")
    assert cfg.rope_parameters["llama_4_scaling_beta"] == 0.1 and cfg.max_position_embeddings == 16 * ORIGINAL_MAX
    torch.manual_seed(0)
    model = new_model(cfg)
    with torch.no_grad():
        model.diffusion_head.weight.mul_(8.0)
    return model.eval()


def _single(model, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    logits, _ = model(torch.tensor([ids]), attention_mask=causal_mask(torch.ones(1, n, dtype=torch.bool), n),
                      position_ids=torch.arange(n)[None])
    return logits[0]


def test_left_padded_batch_equals_single_sequences_past_the_threshold(long_model):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 90, (n,), generator=g).tolist() for n in (40, 29, 13)]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        valid[i, width - len(s):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched, _ = long_model(ids, attention_mask=causal_mask(valid, width), position_ids=positions)
        naive, _ = long_model(ids, attention_mask=causal_mask(valid, width),
                              position_ids=torch.arange(width)[None].expand(len(seqs), -1))
        for i, s in enumerate(seqs):
            ref = _single(long_model, s)
            torch.testing.assert_close(batched[i, width - len(s):], ref, atol=ATOL, rtol=0)
            if len(s) < width:  # slot-based positions would be wrong here: the test can tell them apart
                assert (naive[i, width - len(s):] - ref).abs().max() > 1e-3


def test_multi_block_student_pass_equals_one_draft_forward_each(long_model):
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(1, 90, (48,), generator=g).tolist()
    k = 5
    starts = torch.tensor([[3, 9, 17, 26, 40]])  # blocks before, across and well past the threshold
    batch = DraftBatch(torch.tensor([seq]), torch.tensor([len(seq)]), starts, k)
    with torch.no_grad():
        cache = teacher_pass(long_model, batch, None).cache
        student = student_logits(long_model, batch, cache, long_model.mask_token_id)[0]
        for b, s in enumerate(starts[0].tolist()):
            prefix = DynamicCache(config=long_model.config)
            long_model(torch.tensor([seq[:s]]), attention_mask=causal_mask(torch.ones(1, s, dtype=torch.bool), s),
                       position_ids=torch.arange(s)[None], cache=prefix)
            block = torch.tensor([[seq[s]] + [long_model.mask_token_id] * k])
            ref, _ = long_model(block, attention_mask=draft_mask(torch.ones(1, s + k + 1, dtype=torch.bool), k + 1),
                                position_ids=torch.arange(s, s + k + 1)[None], cache=prefix)
            torch.testing.assert_close(student[b], ref[0, 1:], atol=ATOL, rtol=0)


def test_ragged_greedy_self_spec_equals_ar_past_the_threshold(long_model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 90, (n,), generator=g).tolist() for n in (5, 17, 11)]
    ar = long_model.generate(prompts, mode="ar", max_new_tokens=40)
    for k in (1, 3):
        spec = long_model.generate(prompts, mode="self_spec", max_new_tokens=40, draft_len=k)
        assert spec.sequences == ar.sequences
