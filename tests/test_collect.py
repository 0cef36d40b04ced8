"""AR-target collection: equals the runtime, resumes after kill -9, merges two processes, refuses mismatches."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nld_lora
from nld_lora.data import CollectConfig, CollectError, collect, load_collected, read_prompts
from nld_lora.data.collect import SHARD_DIR
from tests.helpers import ROOT, rank_errors, run_two_processes, saved_tiny_model


def _prompts(path: Path, n: int) -> Path:
    rows = [{"id": f"p{i:03d}", "prompt": f"def f{i}(a, b):\n    return a" + " + b" * (i % 5)} for i in range(n)]
    rows.append(dict(rows[0], id="dup"))  # exact duplicate text: dropped and counted
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _expected(model_dir: str, prompts: Path, max_new: int) -> dict:
    model = nld_lora.load(model_dir)
    records, _ = read_prompts(prompts)
    records = [r for r in records if r.id != "dup"]
    res = model.generate([r.prompt for r in records], mode="ar", max_new_tokens=max_new)
    return {r.id: seq for r, seq in zip(records, res.sequences)}


def test_targets_equal_runtime_ar_and_fingerprint_is_checked(tmp_path):
    model_dir = saved_tiny_model(tmp_path / "m")
    prompts = _prompts(tmp_path / "p.jsonl", 12)
    model = nld_lora.load(model_dir)
    records, _ = read_prompts(prompts)
    summary = collect(model, records, tmp_path / "out", CollectConfig(max_new_tokens=16, batch_size=5, shard_size=4),
                      progress=False)
    assert summary.generated == 12 and summary.skipped == {"duplicate": 1}
    ds = load_collected(tmp_path / "out", model=model)
    assert dict(zip(ds["prompt_id"], ds["target_ids"])) == _expected(model_dir, prompts, 16)
    assert set(ds.column_names) >= {"prompt_id", "prompt_text", "prompt_ids", "target_ids", "target_text",
                                    "finish_reason"}
    again = collect(model, records, tmp_path / "out", CollectConfig(max_new_tokens=16), progress=False)
    assert again.generated == 0 and again.done_before == 12
    other = nld_lora.load(saved_tiny_model(tmp_path / "other", seed=1))
    with pytest.raises(CollectError, match="re-collect for this model"):
        load_collected(tmp_path / "out", model=other)
    with pytest.raises(CollectError, match=r"different generator \(differs in \['decoding'\]\)"):
        collect(model, records, tmp_path / "out", CollectConfig(max_new_tokens=99), progress=False)
    for changed in (CollectConfig(max_new_tokens=16, length_policy="truncate_left"),
                    CollectConfig(max_new_tokens=16, max_prompt_tokens=8)):
        with pytest.raises(CollectError, match="different generator"):
            collect(model, records, tmp_path / "out", changed, progress=False)
    scaled = nld_lora.load(model_dir)
    scaled.config.rope_parameters["rope_theta"] = 99.0  # same weights, another config: other targets
    with pytest.raises(CollectError, match=r"differs in \['config_hash'\]"):
        collect(scaled, records, tmp_path / "out", CollectConfig(max_new_tokens=16), progress=False)
    edited = [dataclasses.replace(r, prompt=r.prompt + "  # edited") if r.id == "p003" else r for r in records]
    with pytest.raises(CollectError, match=r"1 prompt\(s\) changed since their targets were collected.*p003"):
        collect(model, edited, tmp_path / "out", CollectConfig(max_new_tokens=16), progress=False)
    assert len(load_collected(tmp_path / "out")) == 12  # nothing written was lost


def test_unwritable_output_and_vllm_absence(tmp_path):
    model = nld_lora.load(saved_tiny_model(tmp_path / "m"))
    records, _ = read_prompts(_prompts(tmp_path / "p.jsonl", 2))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CollectError, match="not writable"):
        collect(model, records, blocker / "out", progress=False)
    try:  # vLLM is absent on CPU machines: the vLLM path must say so clearly
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed")
    except ImportError:
        pass
    with pytest.raises(CollectError, match="needs vLLM"):
        collect(model, records, tmp_path / "v", CollectConfig(backend="vllm"), progress=False)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nld_lora.cli", "collect", *args]


@pytest.mark.slow
def test_kill_9_then_resume_gives_every_prompt_once(tmp_path):
    model_dir = saved_tiny_model(tmp_path / "m")
    prompts = _prompts(tmp_path / "p.jsonl", 30)
    out = tmp_path / "out"
    args = _cli("--model", model_dir, "--prompts", str(prompts), "--out", str(out), "--device", "cpu",
                "shard_size=2", "batch_size=2", "max_new_tokens=32")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 600  # a loaded machine (a training run beside it) can take minutes to import torch
    while time.time() < deadline and proc.poll() is None and len(list((out / SHARD_DIR).glob("*.parquet"))) < 2:
        time.sleep(0.02)
    assert proc.poll() is None, "the collection finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(load_collected(out, allow_incomplete=True))
    assert 0 < partial < 30, partial
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["already_done"] == partial and report["generated"] == 30 - partial
    ds = load_collected(out)
    assert sorted(ds["prompt_id"]) == [f"p{i:03d}" for i in range(30)]
    assert dict(zip(ds["prompt_id"], ds["target_ids"])) == _expected(model_dir, prompts, 32)


@pytest.mark.slow
def test_two_processes_merge_without_duplicates(tmp_path):
    model_dir = saved_tiny_model(tmp_path / "m")
    prompts = _prompts(tmp_path / "p.jsonl", 20)
    out = tmp_path / "out"
    res = run_two_processes("collect", "--model", model_dir, "--prompts", str(prompts), "--out", str(out),
                            "--device", "cpu", "shard_size=3", "max_new_tokens=12")
    assert res.returncode == 0, rank_errors(res.stderr)
    shards = list((out / SHARD_DIR).glob("*.parquet"))
    assert {p.name.split("-")[1] for p in shards} == {"r0", "r1"}
    ds = load_collected(out)
    assert len(ds) == len(set(ds["prompt_id"])) == 20
    assert dict(zip(ds["prompt_id"], ds["target_ids"])) == _expected(model_dir, prompts, 12)


def test_length_policy_skips_or_truncates_with_counts(tmp_path):
    model = nld_lora.load(saved_tiny_model(tmp_path / "m"))
    records, _ = read_prompts(_prompts(tmp_path / "p.jsonl", 6))
    lengths = [len(model.tokenizer(r.prompt)["input_ids"]) for r in records[:6]]
    limit = sorted(lengths)[2]
    too_long = sum(n > limit for n in lengths)
    skip = collect(model, records, tmp_path / "skip", CollectConfig(max_new_tokens=4, max_prompt_tokens=limit),
                   progress=False)
    assert skip.skipped["too_long"] == too_long > 0 and skip.generated == 6 - too_long
    cut = collect(model, records, tmp_path / "cut", CollectConfig(max_new_tokens=4, max_prompt_tokens=limit,
                                                                  length_policy="truncate_left"), progress=False)
    assert cut.truncated == too_long and cut.generated == 6
    assert max(len(ids) for ids in load_collected(tmp_path / "cut")["prompt_ids"]) <= limit


def test_branches_add_sampled_starts_with_greedy_answers(tmp_path):
    """Each branch: the prompt, 1..branch_tokens sampled tokens, then exactly the runtime's greedy AR answer from
    there; branch rows go with their prompt (same group, id <prompt>#b<n>) and change the fingerprint."""
    model_dir = saved_tiny_model(tmp_path / "m")
    prompts = _prompts(tmp_path / "p.jsonl", 6)
    model = nld_lora.load(model_dir)
    records, _ = read_prompts(prompts)
    cfg = CollectConfig(max_new_tokens=12, batch_size=4, branches=2, branch_tokens=6)
    collect(model, records, tmp_path / "out", cfg, progress=False)
    ds = load_collected(tmp_path / "out", model=model)
    rows = {pid: (b, p, t) for pid, b, p, t in zip(ds["prompt_id"], ds["branch"], ds["prompt_ids"], ds["target_ids"])}
    assert len(rows) == 18 and sorted(b for b, _, _ in rows.values()) == [0] * 6 + [1] * 6 + [2] * 6
    greedy = model.generate([p for _, p, _ in rows.values()], mode="ar", max_new_tokens=12).sequences
    assert [t for _, _, t in rows.values()] == greedy
    for pid, (branch, ids, _) in rows.items():
        if branch:
            parent = rows[pid.rpartition("#b")[0]][1]
            assert pid.endswith(f"#b{branch}") and ids[:len(parent)] == parent
            assert 1 <= len(ids) - len(parent) <= 6
    assert len({tuple(p) for b, p, _ in rows.values() if b}) > 6  # starts differ between branches
    with pytest.raises(CollectError, match="different generator"):
        collect(model, records, tmp_path / "out", CollectConfig(max_new_tokens=12, batch_size=4), progress=False)
    with pytest.raises(CollectError, match="branches"):
        CollectConfig(branches=-1).validate(model.tokenizer)
