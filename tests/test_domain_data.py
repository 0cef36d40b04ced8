"""The embedded domain: prompt files split by source file, non-empty, deterministic; the shipped model works."""

import json
import sysconfig
from pathlib import Path

import torch

import nld_lora
from nld_lora.model.masks import causal_mask, draft_mask, dual_stream_mask, dual_stream_positions
from tests.helpers import EMBEDDED, ROOT, load_script


def _builder():
    return load_script("make_domain_data")


def _rows(name):
    return [json.loads(line) for line in (ROOT / "data" / "prompts" / name).read_text().splitlines()]


def test_committed_prompt_sets_split_by_file_and_are_sane():
    train, held = _rows("code_train.jsonl"), _rows("code_eval.jsonl")
    assert len(train) >= 1000 and len(held) >= 200
    assert not {r["source_file"] for r in train} & {r["source_file"] for r in held}
    for r in train + held:
        assert r["prompt"].strip() and r["id"] and r["category"]
        assert "test" not in Path(r["source_file"]).parts
    assert len({r["id"] for r in train + held}) == len(train) + len(held)
    assert len({r["category"] for r in train}) >= 3


def test_builder_is_deterministic_and_splits_by_file(tmp_path):
    builder = _builder()
    root = Path(sysconfig.get_paths()["stdlib"]) / "json"
    outs = []
    for run in ("a", "b"):
        counts = builder.build(tmp_path / run / "p", tmp_path / run / "c", 0, 0.5, 100, 100, root=root)
        outs.append({f: (tmp_path / run / "p" / f).read_bytes() for f in ("code_train.jsonl", "code_eval.jsonl")})
        assert counts["train"]["prompts"] + counts["eval"]["prompts"] > 0
    assert outs[0] == outs[1]
    train = [json.loads(x) for x in outs[0]["code_train.jsonl"].decode().splitlines()]
    held = [json.loads(x) for x in outs[0]["code_eval.jsonl"].decode().splitlines()]
    assert not {r["source_file"] for r in train} & {r["source_file"] for r in held}


def test_shipped_checkpoint_loads_and_runs_every_mode():
    model = nld_lora.load(EMBEDDED)
    assert model.tokenizer is not None and model.tokenizer.mask_token_id == model.mask_token_id
    ids = torch.tensor([model.tokenizer("def add(a, b):\n    return")["input_ids"]])
    n = ids.shape[1]
    valid = torch.ones(1, n, dtype=torch.bool)
    causal, _ = model(ids, attention_mask=causal_mask(valid, n), position_ids=torch.arange(n)[None])
    draft, _ = model(ids, attention_mask=draft_mask(valid, n), position_ids=torch.arange(n)[None])
    dual, _ = model(torch.cat([ids, ids], 1), attention_mask=dual_stream_mask(n, model.block_size),
                    position_ids=dual_stream_positions(n, 1))
    for logits in (causal, draft, dual):
        assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.vocab_size
    torch.testing.assert_close(dual[:, n:], causal, atol=1e-4, rtol=0)
    res = model.generate("def add(a, b):\n", mode="ar", max_new_tokens=16)
    prompt = model.tokenizer("def add(a, b):\n")["input_ids"]
    seq = list(prompt)  # greedy AR by hand: a full causal forward per token, no cache
    for _ in range(16):
        logits, _ = model(torch.tensor([seq]), attention_mask=causal_mask(torch.ones(1, len(seq), dtype=torch.bool),
                                                                            len(seq)),
                          position_ids=torch.arange(len(seq))[None])
        seq.append(int(logits[0, -1].argmax()))
        if seq[-1] in model.eos_token_ids:
            break
    assert res.sequences[0] == seq[len(prompt):] and res.texts[0].strip()


def test_undocumented_prompts_are_other_functions_of_the_same_files():
    """--undocumented: extra training contexts from the functions without a docstring; none is a documented one."""
    import ast
    import random

    builder = _builder()
    source = ('def documented(x):\n    """Say what."""\n    y = x + 1\n    return y\n\n\n'
              'def bare(x):\n    y = x * 2\n    z = y - 1\n    return z\n')
    doc = builder.prompts_from_source(source, "m.py", random.Random(0))
    bare = builder.prompts_from_source(source, "m.py", random.Random(0), documented=False)
    assert [r["id"] for r in doc] == ["m.py:1:documented"] and [r["id"] for r in bare] == ["m.py:7:bare"]
    fn = ast.parse(source).body[1]
    assert bare[0]["prompt"].startswith("def bare(x):\n    y = x * 2") and '"""' not in bare[0]["prompt"]
    assert bare[0]["reference"] and bare[0]["prompt"].count("\n") < fn.end_lineno - fn.lineno


def test_the_default_training_prompts_hold_the_documented_set_and_no_held_out_file():
    every, documented, held = _rows("code_train_all.jsonl"), _rows("code_train.jsonl"), _rows("code_eval.jsonl")
    ids = [r["id"] for r in every]
    assert len(ids) == len(set(ids)) and {r["id"] for r in documented} <= set(ids)
    assert not {r["source_file"] for r in every} & {r["source_file"] for r in held}
    assert all(r["prompt"].strip() and r["source_file"] for r in every)


def test_training_functions_copied_from_eval_files_are_dropped(tmp_path):
    """Copied code must not leak held-out functions into training: an eval file's function copied into a train
    file, or a train prompt equal to an eval prompt, is dropped from the train prompts; nothing else is."""
    builder = _builder()
    names = [f"m{i}.py" for i in range(40)]
    train_file = next(n for n in names if builder.split_of(n, 0, 0.5) == "train")
    eval_file = next(n for n in names if builder.split_of(n, 0, 0.5) == "eval")
    copied = 'def copied(x):\n    """Shared."""\n    y = x + 1\n    z = y * 2\n    return z\n'
    own = 'def own(x):\n    """Only here."""\n    y = x - 1\n    z = y * 3\n    return z\n'
    root = tmp_path / "src"
    root.mkdir()
    (root / train_file).write_text(copied + "\n\n" + own)
    (root / eval_file).write_text(copied)
    counts = builder.build(tmp_path / "p", tmp_path / "c", 0, 0.5, 100, 100, root=root)
    train = [json.loads(x) for x in (tmp_path / "p" / "code_train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "p" / "code_eval.jsonl").read_text().splitlines()]
    assert [r["id"].split(":")[-1] for r in train] == ["own"] and [r["id"].split(":")[-1] for r in held] == ["copied"]
    assert counts["train_dropped_as_eval_copies"] == 1


def test_committed_training_prompts_share_no_prompt_with_their_eval_set():
    for train, held in (("code_train_all.jsonl", "code_eval.jsonl"), ("code_train.jsonl", "code_eval.jsonl"),
                        ("transformers_train.jsonl", "transformers_eval.jsonl"),
                        ("transformers_train_mix.jsonl", "transformers_eval.jsonl")):
        assert not {r["prompt"] for r in _rows(train)} & {r["prompt"] for r in _rows(held)}, train


def test_deep_cuts_keep_at_least_four_body_lines_and_skip_short_functions():
    import random

    builder = _builder()
    body = "".join(f"    v{i} = {i}\n" for i in range(8))
    source = 'def long(x):\n    """Doc."""\n' + body + "    return x\n\n\ndef short(x):\n    y = 1\n    return y\n"
    deep = builder.prompts_from_source(source, "m.py", random.Random(0), deep=True)
    assert len(deep) == 1 and deep[0]["id"].startswith("m.py:1:long@")
    body_lines = deep[0]["prompt"].splitlines()[2:]
    assert len(body_lines) >= builder.DEEP_MIN_LINES and deep[0]["reference"].strip()
