"""Drafter objective and training loop: training sees exactly what deployment does."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

import nld_lora
from nld_lora.adapter.attach import lora_enabled
from nld_lora.config_io import ConfigError, load_config
from nld_lora.data import read_prompts
from nld_lora.model.masks import causal_mask, draft_mask
from nld_lora.train import LoraSettings, TrainConfig, train
from nld_lora.train.objective import DraftBatch, draft_loss, row_validity, student_logits, teacher_pass
from tests.helpers import (
    EMBEDDED,
    ROOT,
    make_adapter,
    pathway_outputs,
    rank_errors,
    run_two_processes,
    tiny_model,
)

EVAL_PROMPTS = ROOT / "data" / "prompts" / "code_eval.jsonl"


def test_student_layout_equals_blocks_run_one_by_one():
    model = tiny_model(seed=3)
    ids = torch.randint(1, 90, (2, 20))
    k = 3
    batch = DraftBatch(ids, torch.tensor([20, 15]), torch.tensor([[5, 9, 13], [4, 11, -1]]), k)
    cache = teacher_pass(model, batch, None).cache
    student = student_logits(model, batch, cache, model.mask_token_id)
    assert cache.get_seq_length() == 20  # the student pass leaves the teacher cache as it was
    for b in range(2):
        for j, s in enumerate(batch.starts[b].tolist()):
            if s < 0:
                continue
            c = DynamicCache(config=model.config)
            model(ids[b:b + 1, :s], attention_mask=causal_mask(torch.ones(1, s, dtype=torch.bool), s),
                  position_ids=torch.arange(s)[None], cache=c)
            block = torch.tensor([[int(ids[b, s])] + [model.mask_token_id] * k])
            ref, _ = model(block, attention_mask=draft_mask(torch.ones(1, s + k + 1, dtype=torch.bool), k + 1),
                           position_ids=torch.arange(s, s + k + 1)[None], cache=c)
            torch.testing.assert_close(student[b, j], ref[0, 1:], atol=1e-5, rtol=0)


def test_quadratic_draft_layout_hides_the_seed_like_a_single_forward_sub_block():
    """layout="quadratic": row j of a block == mask row j of a sub-block that sees the prefix before s only."""
    model = tiny_model(seed=3)
    ids = torch.randint(3, 90, (1, 20))
    k, s = 3, 9
    batch = DraftBatch(ids, torch.tensor([20]), torch.tensor([[s]]), k, "quadratic")
    cache = teacher_pass(model, batch, None).cache
    student = student_logits(model, batch, cache, model.mask_token_id)
    c = DynamicCache(config=model.config)
    model(ids[:, :s], attention_mask=causal_mask(torch.ones(1, s, dtype=torch.bool), s),
          position_ids=torch.arange(s)[None], cache=c)
    block = torch.full((1, k + 1), model.mask_token_id)
    ref, _ = model(block, attention_mask=draft_mask(torch.ones(1, s + k + 1, dtype=torch.bool), k + 1),
                   position_ids=torch.arange(s, s + k + 1)[None], cache=c)
    torch.testing.assert_close(student[0, 0], ref[0, 1:], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="draft_layout"):
        TrainConfig(draft_layout="diagonal").validate()


def test_distillation_has_zero_gradient_when_student_equals_teacher():
    teacher = torch.randn(2, 3, 4, 50)
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    for distill in ("lk_hybrid", "kl", "tv"):
        student = teacher.clone().requires_grad_()
        out = draft_loss(student, teacher, valid, ce_weight=0.0, distill=distill, position_weighting="uniform")
        out.loss.backward()
        assert out.loss.item() < 1e-6 and float(student.grad.abs().max()) < 1e-6
    student = (teacher + torch.randn_like(teacher)).requires_grad_()
    draft_loss(student, teacher, valid, ce_weight=0.0).loss.backward()
    assert float(student.grad.abs().max()) > 1e-4


def _runtime_cycles(tmp_path, seed: int, batch_size: int):
    """The embedded model with a random adapter, its greedy self-speculation over 4 eval prompts (48 tokens, cycle
    stats) and the AR continuation long enough to score every drafted row."""
    model = nld_lora.load(EMBEDDED)
    model.attach_adapter(make_adapter(model, tmp_path / "lora", r=4, seed=seed))
    records, _ = read_prompts(EVAL_PROMPTS, limit=4)
    prompts = [r.prompt for r in records]
    k = model.block_size - 1
    res = model.generate(prompts, mode="self_spec", max_new_tokens=48, batch_size=batch_size)
    ar = model.generate(prompts, mode="ar", max_new_tokens=48 + k + 1)
    return model, res, ar, k


def test_training_recomputes_exactly_the_runtime_drafts(tmp_path):
    """Runtime cycles (adapter attached, greedy) vs the training student pass at the same start positions."""
    model, res, ar, k = _runtime_cycles(tmp_path, seed=0, batch_size=2)
    cycles = 0
    for i, st in enumerate(res.stats.requests):
        seq = res.prompt_ids[i] + ar.sequences[i]
        starts = torch.tensor([st.cycle_starts])
        batch = DraftBatch(torch.tensor([seq]), torch.tensor([len(seq)]), starts, k)
        passed = teacher_pass(model, batch, model.active_adapter)
        cache, teacher = passed.cache, passed.blocks(batch)
        with lora_enabled(model, model.active_adapter, on=True):
            student = student_logits(model, batch, cache, model.mask_token_id)
        assert student.argmax(-1)[0].tolist() == st.cycle_drafts
        accepted = (student.argmax(-1) == teacher.argmax(-1)).int().cumprod(-1).sum(-1)[0]
        assert (accepted + 1).tolist() == st.acceptance_lengths
        cycles += len(st.cycle_starts)
    assert cycles > 10 and res.stats.acceptance_length > 1.2


def test_deployed_walk_runs_the_runtime_cycles(tmp_path):
    """The training-side walk over AR targets (rows padded together) starts its cycles where the runtime's greedy
    self-speculation started them and commits as many tokens in each."""
    from nld_lora.train.data import Sequence, make_batch
    from nld_lora.train.objective import deployed_walk

    model, res, ar, k = _runtime_cycles(tmp_path, seed=1, batch_size=4)
    seqs = [Sequence(res.prompt_ids[i] + ar.sequences[i], len(res.prompt_ids[i]), str(i)) for i in range(4)]
    batch = make_batch(seqs, 2, k, torch.Generator().manual_seed(0), model.config.pad_token_id or 0)
    passed = teacher_pass(model, batch, model.active_adapter, span=True)
    with lora_enabled(model, model.active_adapter, on=True):
        starts, commits = deployed_walk(model, batch, passed, model.mask_token_id)
    for i, st in enumerate(res.stats.requests):
        n = len(st.cycle_starts)
        assert starts[i, :n].tolist() == st.cycle_starts and commits[i, :n].tolist() == st.acceptance_lengths
        assert sum(st.acceptance_lengths) >= 48 - 1
    assert sum(len(st.cycle_starts) for st in res.stats.requests) > 10


def test_teacher_span_gives_the_block_rows_of_any_later_block_set():
    from nld_lora.train.objective import sample_starts

    model = tiny_model(seed=3)
    ids = torch.randint(3, 90, (2, 24))
    first = torch.tensor([4, 6])
    batch = DraftBatch(ids, torch.tensor([24, 19]), torch.tensor([[5, 9, 13], [6, 11, -1]]), 3, first_start=first)
    later = DraftBatch(ids, batch.lengths, torch.tensor([[4, 20, -1], [7, 15, 16]]), 3, first_start=first)
    span = teacher_pass(model, batch, None, span=True)
    for b in (batch, later):
        valid = row_validity(b)  # rows past a sequence's end or of unused blocks are never scored
        torch.testing.assert_close(span.blocks(b)[valid], teacher_pass(model, b, None).blocks(b)[valid], atol=1e-5,
                                   rtol=0)
    with pytest.raises(ValueError, match="span=True"):
        teacher_pass(model, batch, None).blocks(later)
    walked = torch.tensor([[4, 9, 12, -1, -1], [6, -1, -1, -1, -1]])
    picked = sample_starts(walked, 3, torch.Generator().manual_seed(0))
    assert sorted(picked[0].tolist()) == [4, 9, 12] and sorted(picked[1].tolist()) == [-1, -1, 6]
    assert sample_starts(walked, 8, torch.Generator()).shape == (2, 8)


def _small_cfg(**kw) -> TrainConfig:
    base = dict(lora=LoraSettings(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                steps=40, batch_size=8, blocks_per_seq=8, eval_every=20, save_every=20, log_every=4, lr=2e-3,
                eval_fraction=0.25, eval_blocks_per_seq=16)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_few_steps_reduce_loss_and_raise_simulated_acceptance(collected, tmp_path):
    caller_model = nld_lora.load(EMBEDDED)
    res = train(caller_model, collected, tmp_path / "run", _small_cfg(), progress=False)
    assert caller_model.adapters == {} and not any("lora_" in n for n, _ in caller_model.named_modules())
    fresh = nld_lora.load(EMBEDDED)
    assert all(torch.equal(a, b) for a, b in zip(caller_model.state_dict().values(), fresh.state_dict().values()))
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert res.best_simulated_acceptance > res.baseline_simulated_acceptance
    evals = [r for r in log if r.get("eval")]
    assert all(r["deployed_baseline"] == res.deployed_baseline for r in evals)
    assert res.deployed_best == next(r["deployed_acceptance"] for r in evals if r["step"] == res.best_step)
    assert 1.0 < res.deployed_baseline < res.baseline_simulated_acceptance + 0.5
    meta = json.loads((Path(res.adapter_dir) / "nld_adapter.json").read_text())
    assert meta["base_weights_hash"] == nld_lora.load(EMBEDDED).weights_hash
    model = nld_lora.load(EMBEDDED)
    model.attach_adapter(res.adapter_dir)  # loads back through the runtime (PEFT folder)
    from peft import PeftModel

    PeftModel.from_pretrained(nld_lora.load(EMBEDDED), res.adapter_dir)  # and through plain PEFT


@pytest.mark.slow
def test_on_policy_blocks_train_on_the_deployed_walk(collected, tmp_path):
    """Blocks at the cycle starts of a greedy walk with the current adapter, beside the uniform ones: the loss falls
    and the deployed loop's tokens per cycle on held-out sequences rise."""
    res = train(EMBEDDED, collected, tmp_path / "run", _small_cfg(on_policy_blocks=True), progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert res.deployed_best > res.deployed_baseline


@pytest.mark.slow
def test_resume_continues_with_identical_results(collected, tmp_path):
    cfg = _small_cfg(steps=8, eval_every=4, save_every=4)
    train(EMBEDDED, collected, tmp_path / "full", cfg, progress=False)
    cfg_stop = _small_cfg(steps=8, eval_every=4, save_every=4, stop_at_step=4)
    train(EMBEDDED, collected, tmp_path / "resumed", cfg_stop, progress=False)
    assert not (tmp_path / "resumed" / "linear_spec_lora").exists()
    train(EMBEDDED, collected, tmp_path / "resumed", cfg, progress=False)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_0000008" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_bad_configs_fail_at_start(collected, tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(TrainConfig, None, ["lora.rank=8"])
    with pytest.raises(ConfigError, match="lora.r must be > 0"):
        train(EMBEDDED, collected, tmp_path / "x", _small_cfg(lora=LoraSettings(r=0)), progress=False)
    with pytest.raises(ConfigError, match=r"lora.target_modules \['qkv'\] not in the model"):
        train(EMBEDDED, collected, tmp_path / "y", _small_cfg(lora=LoraSettings(target_modules=["qkv"])),
              progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_two_processes_match_one_process_quality(collected, tmp_path):
    overrides = ["steps=30", "batch_size=4", "blocks_per_seq=8", "lora.r=16", "lora.alpha=32", "lr=2e-3",
                 "eval_every=30", "save_every=30", "eval_fraction=0.25", "eval_blocks_per_seq=16",
                 "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"]
    one = train(EMBEDDED, collected, tmp_path / "one",
                load_config(TrainConfig, None, [*overrides, "batch_size=8"]), progress=False)
    res = run_two_processes("train", "--model", EMBEDDED, "--data", str(collected), "--out", str(tmp_path / "two"),
                            *overrides)
    assert res.returncode == 0, rank_errors(res.stderr)
    two = json.loads(res.stdout[res.stdout.index("{"):])
    assert two["processes"] == 2 and one.world_size == 1
    assert two["simulated_acceptance_before"] == pytest.approx(one.baseline_simulated_acceptance, abs=1e-3)
    gain_one = one.best_simulated_acceptance - one.baseline_simulated_acceptance
    gain_two = two["simulated_acceptance_after"] - two["simulated_acceptance_before"]
    assert gain_two > 0 and abs(gain_two - gain_one) < 0.5 * gain_one + 0.05


def test_eval_split_keeps_whole_groups_apart():
    from nld_lora.train.data import Sequence, split_eval

    seqs = [Sequence([1, 2, 3], 1, f"f{g}.py:{i}", f"f{g}.py") for g in range(40) for i in range(5)]
    train_seqs, held = split_eval(seqs, 0.2, seed=0, by="group")
    assert held and {s.group for s in held}.isdisjoint({s.group for s in train_seqs})
    assert all(sum(s.group == g for s in held) == 5 for g in {s.group for s in held})  # whole files held out
    _, by_prompt = split_eval(seqs, 0.2, seed=0, by="prompt")
    assert {s.group for s in by_prompt} & {s.group for s in seqs if s not in by_prompt}  # prompts split files


def test_first_position_weight_scales_row_one_and_target_cap_truncates():
    from nld_lora.train.data import build_sequences

    torch.manual_seed(0)
    teacher, student = torch.randn(2, 3, 4, 30), torch.randn(2, 3, 4, 30)
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    ce = torch.nn.functional.cross_entropy(student.flatten(0, -2), teacher.flatten(0, -2).argmax(-1),
                                           reduction="none").view(2, 3, 4)
    w = torch.ones(4)
    w[0] = 5.0
    out = draft_loss(student, teacher, valid, distill="none", position_weighting="uniform", first_position_weight=5.0)
    assert out.loss.item() == pytest.approx(float((ce * w).sum() / (w.sum() * 6)), rel=1e-5)
    rows = {"prompt_id": ["a", "a#b1"], "group": ["f", "f"], "branch": [0, 1], "prompt_ids": [[1, 2], [1, 2, 9]],
            "target_ids": [[3, 4, 5, 6], [7, 8, 9]]}

    class Rows(dict):
        column_names = list(rows)

        def __len__(self):
            return 2

    seqs = build_sequences(Rows(rows), 512, max_target=2)
    assert [s.ids for s in seqs] == [[1, 2, 3, 4], [1, 2, 9, 7, 8]] and [s.branch for s in seqs] == [0, 1]
    assert [s.prompt_len for s in seqs] == [2, 3]  # draft starts stay in the greedy answer


def test_branches_stay_with_their_prompt_in_every_split():
    from nld_lora.train.data import Sequence, split_eval

    seqs = [Sequence([1, 2, 3], 1, f"p{i}" + (f"#b{b}" if b else ""), "", b) for i in range(60) for b in range(3)]
    for by in ("group", "prompt"):
        train_seqs, held = split_eval(seqs, 0.2, seed=0, by=by)
        held_parents = {s.prompt_id.partition("#")[0] for s in held}
        assert held_parents and held_parents.isdisjoint({s.prompt_id.partition("#")[0] for s in train_seqs})


def test_follow_up_blocks_start_where_the_deployed_loop_seeds_next():
    from nld_lora.train.objective import DraftBatch, follow_up_batch

    batch = DraftBatch(torch.zeros(2, 12, dtype=torch.long), torch.tensor([12, 8]),
                       torch.tensor([[2, 5, -1], [3, 4, 6]]), draft_len=4)
    nxt = follow_up_batch(batch, torch.tensor([[0, 3, 2], [1, 4, 0]]))
    assert nxt.starts.tolist() == [[3, 9, -1], [5, -1, -1]]  # s + n + 1; past length - 2 (no target left): -1
    assert nxt.input_ids is batch.input_ids and nxt.draft_len == 4


def test_gradients_survive_a_teacher_pass_between_student_forward_and_backward():
    """The follow-up step runs a teacher pass (adapter off) between the first student forward and the backward:
    the first block set's gradients must still arrive, equal to a backward with no toggle in between."""
    from nld_lora.adapter.attach import TRAINING_ADAPTER as ADAPTER_NAME
    from nld_lora.adapter.attach import add_lora

    model = tiny_model(seed=3)
    add_lora(model, TrainConfig(lora=LoraSettings(r=4, alpha=8)))
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    grads = []
    for toggle in (False, True):
        for p in model.parameters():
            p.grad = None
        with lora_enabled(model, ADAPTER_NAME, on=True):
            out = model(ids)[0]
        if toggle:
            with lora_enabled(model, ADAPTER_NAME, on=False):
                model(ids)
        with lora_enabled(model, ADAPTER_NAME, on=True):
            out.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.slow
def test_retrained_mask_embedding_is_saved_drafts_through_the_twins_and_attaches_in_the_release_layout(
        collected, tmp_path):
    from nld_lora.cli import main
    from nld_lora.model.masks import draft_mask

    model = nld_lora.load(EMBEDDED)
    cfg = _small_cfg(steps=6, eval_every=6, save_every=6, train_mask_embedding=True,
                     lora=LoraSettings(r=4, alpha=8, target_modules=["o_proj"]))
    res = train(model, collected, tmp_path / "run", cfg, progress=False)
    tensors = load_file(Path(res.adapter_dir) / "adapter_model.safetensors")
    rows = [v for k, v in tensors.items() if k.endswith("trainable_tokens_delta")]
    original = model.encoder.embed_tokens.weight[model.mask_token_id].detach().clone()
    assert len(rows) == 1 and rows[0].shape == (1, original.numel()) and not torch.allclose(rows[0][0], original)
    name = model.attach_adapter(res.adapter_dir)
    ids = torch.tensor([[4, 8, 15, model.mask_token_id, model.mask_token_id, model.mask_token_id]])
    valid, pos = torch.ones(1, 6, dtype=torch.bool), torch.arange(6)[None]
    mask = draft_mask(valid, 6)
    out = pathway_outputs(model, name, ids, mask, pos)
    off, on, base, merged = out["off"], out["on"], out["base"], out["merged"]
    with torch.no_grad():
        plain = nld_lora.load(EMBEDDED)(ids, attention_mask=mask, position_ids=pos)[0]
    assert torch.equal(base, off) and torch.equal(base, plain)  # adapter off: the original mask embedding
    assert torch.allclose(merged, on, atol=1e-5)
    prompts = [r.prompt for r in read_prompts(str(ROOT / "data" / "prompts" / "code_eval.jsonl"), limit=3)[0]]
    ar = model.generate(prompts, mode="ar", max_new_tokens=16)
    assert model.generate(prompts, mode="self_spec", adapter=name, max_new_tokens=16).sequences == ar.sequences
    model.detach_adapter()
    assert main(["export", "--model", EMBEDDED, "--release-layout", str(tmp_path / "rel"),
                 "--adapter", res.adapter_dir]) == 0
    released = nld_lora.load(str(tmp_path / "rel"))
    released.attach_adapter("linear_spec_lora")
    with torch.no_grad(), lora_enabled(released, "linear_spec_lora", True):
        assert torch.allclose(released(ids, attention_mask=mask, position_ids=pos)[0], on, atol=1e-5)
