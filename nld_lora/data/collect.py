"""Stage 1: turn user prompts into the model's own AR answers, as resumable Parquet shards + a fingerprint.

Each process (under `accelerate launch`) takes every world_size-th pending prompt, generates with the runtime
in AR mode (adapter off), and writes finished results in atomic shards. A re-run skips prompt ids already in
shards, so a killed job resumes with every prompt exactly once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nld_lora.config_io import ConfigError, bounded, check_ranges, writable_dir
from nld_lora.data.readers import FieldMap, PromptRecord
from nld_lora.data.templates import render_prompt
from nld_lora.data.vllm_backend import VLLMError, VLLMGenerator
from nld_lora.decoding.api import max_prompt_tokens
from nld_lora.decoding.settings import DecodeSettings

META_FILE = "nld_collect.json"
SHARD_DIR = "data"
COLUMNS = ("prompt_id", "category", "group", "prompt_text", "prompt_ids", "target_ids", "target_text", "finish_reason",
           "branch")
BRANCH_SEP = "#b"  # a branch row's id: <prompt id>#b<n>


class CollectError(ValueError):
    """A collection that cannot start or a dataset that does not belong to the model."""


@dataclass
class CollectConfig:
    max_new_tokens: int = bounded(128, ge=1)
    decode: DecodeSettings = field(default_factory=DecodeSettings)  # AR sampling: temperature, top_k, top_p, seed
    limit: int | None = bounded(None, ge=1)  # read at most this many prompts (callers that read the prompt file apply it)
    fields: FieldMap = field(default_factory=FieldMap)  # column names in the prompt file
    skip_bad: bool = False  # skip and count malformed prompt rows instead of failing
    batch_size: int = bounded(8, ge=1)
    shard_size: int = bounded(64, ge=1)
    max_prompt_tokens: int | None = bounded(None, ge=1)
    length_policy: str = "skip"
    system_prompt: str | None = None
    use_chat_template: bool | None = None  # None: only for conversations, or when a system prompt is given
    thinking: str = "keep"  # keep: reasoning text stays in targets as generated | cap: cut at max_thinking_tokens
    max_thinking_tokens: int | None = bounded(None, ge=0)  # cap: force end_think_token after this many tokens without one
    end_think_token: str = "[/THINK]"
    backend: str = "runtime"
    tensor_parallel_size: int | None = bounded(None, ge=1)  # vllm backend: GPUs per engine (None: all visible)
    vllm_memory_utilization: float | None = bounded(None, gt=0)  # vllm backend: fraction of device (CPU: host) memory vLLM may
    # reserve; None: 80% of what is free when it starts, at most 0.9
    branches: int = bounded(0, ge=0)  # extra training contexts per prompt: a sampled start, then the model's greedy answer
    branch_tokens: int = bounded(48, ge=1)  # a branch's sampled start is 1..branch_tokens tokens (seeded per branch)
    branch_temperature: float = bounded(1.0, gt=0)

    def validate(self, tokenizer: Any) -> None:
        try:
            check_ranges(self)
        except ConfigError as err:
            raise CollectError(str(err)) from err
        if self.backend not in ("runtime", "vllm"):
            raise CollectError(f"backend={self.backend!r}; expected 'runtime' or 'vllm'")
        if self.vllm_memory_utilization is not None and not 0 < self.vllm_memory_utilization < 1:
            raise CollectError(f"vllm_memory_utilization={self.vllm_memory_utilization}; expected a fraction in (0, 1)")
        if self.branches and self.thinking == "cap":
            raise CollectError("branches and thinking='cap' cannot be combined")
        if self.thinking not in ("keep", "cap"):
            raise CollectError(f"thinking={self.thinking!r}; expected 'keep' or 'cap'")
        if self.thinking == "cap":
            if not self.max_thinking_tokens or self.max_thinking_tokens < 1:
                raise CollectError("thinking='cap' needs max_thinking_tokens >= 1")
            if self.max_thinking_tokens >= self.max_new_tokens:
                raise CollectError(f"max_thinking_tokens={self.max_thinking_tokens} must be below "
                                   f"max_new_tokens={self.max_new_tokens} (room for the answer)")
            if tokenizer is not None and self.end_think_token not in tokenizer.get_vocab():
                raise CollectError(f"end_think_token={self.end_think_token!r} is not a token of this tokenizer")


@dataclass
class CollectSummary:
    prompts_total: int = 0
    done_before: int = 0
    generated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    thinking_capped: int = 0
    target_tokens: int = 0
    wall_s: float = 0.0


@dataclass
class PreparedPrompt:
    record: PromptRecord
    text: str
    ids: list[int]


def generator_fingerprint(model: Any, cfg: CollectConfig) -> dict[str, Any]:
    """What determines the targets: model identity and weights, decoding and templating parameters."""
    decoding = {k: getattr(cfg, k) for k in ("max_new_tokens", "system_prompt", "use_chat_template", "thinking",
                                             "max_thinking_tokens", "end_think_token", "backend", "length_policy",
                                             "max_prompt_tokens")}
    decoding["sampling"] = {k: getattr(cfg.decode, k) for k in ("temperature", "top_k", "top_p", "seed")}
    if cfg.branches:
        decoding["branches"] = {k: getattr(cfg, k) for k in ("branches", "branch_tokens", "branch_temperature")}
    return {"model": model.name_or_path, "weights_hash": model.weights_hash, "config_hash": config_hash(model),
            "dtype": str(model.dtype), "decoding": decoding}


def config_hash(model: Any) -> str:
    """sha256 of the model's config: the same weights under another config (e.g. RoPE scaling) decode
    differently."""
    import hashlib

    text = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare(model: Any, records: list[PromptRecord], cfg: CollectConfig,
            summary: CollectSummary) -> list[PreparedPrompt]:
    """Render, tokenize, drop exact duplicates (same rendered text) and apply the length policy."""
    tok = model.tokenizer
    if tok is None:
        raise CollectError("collection needs a tokenizer in the model folder")
    if cfg.length_policy not in ("skip", "truncate_left"):
        raise CollectError(f"length_policy={cfg.length_policy!r}; expected 'skip' or 'truncate_left'")
    limit = cfg.max_prompt_tokens or max_prompt_tokens(model, "ar", cfg.max_new_tokens)
    seen_text: set[str] = set()
    seen_ids: set[str] = set()
    out = []
    skipped = dict(summary.skipped)
    for rec in records:
        text = render_prompt(rec, tok, system_prompt=cfg.system_prompt, use_chat_template=cfg.use_chat_template)
        if text in seen_text or rec.id in seen_ids:
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            continue
        seen_text.add(text)
        seen_ids.add(rec.id)
        ids = tok(text, add_special_tokens=rec.messages is None)["input_ids"]
        if not ids:
            skipped["empty"] = skipped.get("empty", 0) + 1
            continue
        if len(ids) > limit:
            if cfg.length_policy == "skip":
                skipped["too_long"] = skipped.get("too_long", 0) + 1
                continue
            ids = ids[-limit:]
            text = tok.decode(ids)
            summary.truncated += 1
        out.append(PreparedPrompt(rec, text, ids))
    summary.skipped = skipped
    return out


def _done_ids(out_dir: Path, prepared: list[PreparedPrompt]) -> set[str]:
    """Prompt ids already in shards; a prompt whose text changed since its target was collected is an error (its
    stale target would be reused)."""
    import pyarrow.parquet as pq

    text_of = {p.record.id: p.text for p in prepared}
    done: set[str] = set()
    changed: list[str] = []
    for shard in sorted((out_dir / SHARD_DIR).glob("*.parquet")):
        table = pq.read_table(shard, columns=["prompt_id", "prompt_text"])
        for pid, text in zip(table.column("prompt_id").to_pylist(), table.column("prompt_text").to_pylist()):
            done.add(pid)
            if pid in text_of and text_of[pid] != text:
                changed.append(pid)
    if changed:
        raise CollectError(f"{out_dir}: {len(changed)} prompt(s) changed since their targets were collected "
                           f"(e.g. {changed[:3]}); use another output folder")
    return done


def _write_shard(out_dir: Path, rows: list[dict[str, Any]], rank: int) -> None:
    """Write one shard atomically: a temporary file renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    name = f"shard-r{rank}-{time.time_ns()}-{uuid.uuid4().hex[:6]}.parquet"
    tmp = out_dir / SHARD_DIR / f".{name}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / SHARD_DIR / name)


def _generate_runtime(model: Any, prompts: list[list[int]], cfg: CollectConfig, max_new_tokens: int,
                      out_dir: Path) -> tuple[list, list]:
    res = model.generate(prompts, mode="ar", adapter=False, max_new_tokens=max_new_tokens, settings=cfg.decode)
    return res.sequences, res.finish_reasons


def branch_rows(model: Any, batch: list[PreparedPrompt], cfg: CollectConfig, generate: Any,
                out_dir: Path) -> list[tuple[PreparedPrompt, int, list[int], list[int], str]]:
    """cfg.branches extra contexts per prompt: (prompt, branch n, prompt ids + a sampled start, the greedy answer
    from there, finish reason). Start lengths are drawn per branch from a hash of its id; the greedy answers are
    the targets, so every verified position still holds the model's own greedy AR token."""
    import hashlib

    from nld_lora.decoding.settings import DecodeSettings

    sampler = CollectConfig(decode=DecodeSettings(temperature=cfg.branch_temperature, seed=cfg.decode.seed),
                            backend=cfg.backend, vllm_memory_utilization=cfg.vllm_memory_utilization,
                            tensor_parallel_size=cfg.tensor_parallel_size)
    jobs = [(p, n) for n in range(1, cfg.branches + 1) for p in batch]
    starts, _ = generate(model, [p.ids for p, _ in jobs], sampler, cfg.branch_tokens, out_dir)
    contexts = []
    for (p, n), sampled in zip(jobs, starts):
        draw = int(hashlib.sha256(f"{cfg.decode.seed}:{p.record.id}:{n}".encode()).hexdigest()[:8], 16)
        contexts.append(p.ids + sampled[: 1 + draw % cfg.branch_tokens])
    answers, reasons = generate(model, contexts, cfg, cfg.max_new_tokens, out_dir)
    return [(p, n, ctx, ans, why) for (p, n), ctx, ans, why in zip(jobs, contexts, answers, reasons)]


def cap_thinking(model: Any, prompts: list[list[int]], seqs: list[list[int]], reasons: list[str],
                 cfg: CollectConfig, generate: Any, out_dir: Path) -> int:
    """thinking='cap': a target that ran max_thinking_tokens without the end-think token is cut there, the token is
    forced (as NVIDIA's decoding does with a thinking budget), and the answer is generated from that point.
    Edits seqs/reasons in place; returns how many targets were capped."""
    end_id = model.tokenizer.convert_tokens_to_ids(cfg.end_think_token)
    budget = cfg.max_thinking_tokens
    redo = [i for i, s in enumerate(seqs) if len(s) > budget and end_id not in s[:budget]]
    if not redo:
        return 0
    heads = {i: seqs[i][:budget] + [end_id] for i in redo}
    tails, tail_reasons = generate(model, [prompts[i] + heads[i] for i in redo], cfg,
                                   cfg.max_new_tokens - budget - 1, out_dir)
    for i, tail, reason in zip(redo, tails, tail_reasons):
        seqs[i] = heads[i] + tail
        reasons[i] = reason
    return len(redo)


def open_generator(cfg: CollectConfig) -> Callable[..., tuple[list, list]]:
    """The collection's generate function: (model, prompts, cfg, max_new_tokens, out_dir) -> (seqs, reasons)."""
    if cfg.backend == "vllm":
        try:
            return VLLMGenerator()
        except VLLMError as err:
            raise CollectError(str(err)) from err
    return _generate_runtime


def _collect_pending(model: Any, pending: list[PreparedPrompt], cfg: CollectConfig, out: Path, rank: int,
                     generate: Callable[..., tuple[list, list]], summary: CollectSummary, progress: bool,
                     t0: float) -> int:
    """Generate and write shards for the pending prompts; returns the target tokens written."""
    buffer: list[dict[str, Any]] = []
    tokens = 0
    bar = tqdm(total=len(pending), desc=f"collect[rank {rank}]", unit="prompt", disable=not progress)
    for start in range(0, len(pending), cfg.batch_size):
        batch = pending[start:start + cfg.batch_size]
        prompt_ids = [p.ids for p in batch]
        seqs, reasons = generate(model, prompt_ids, cfg, cfg.max_new_tokens, out)
        if cfg.thinking == "cap":
            summary.thinking_capped += cap_thinking(model, prompt_ids, seqs, reasons, cfg, generate, out)
        rows = [(p, 0, p.ids, seq, reason) for p, seq, reason in zip(batch, seqs, reasons)]
        if cfg.branches:
            rows += branch_rows(model, batch, cfg, generate, out)
        for p, branch, ids, seq, reason in rows:
            buffer.append({
                "prompt_id": p.record.id + (f"{BRANCH_SEP}{branch}" if branch else ""), "category": p.record.category,
                "group": p.record.group, "prompt_text": p.text, "prompt_ids": ids, "target_ids": seq,
                "target_text": model.tokenizer.decode(seq), "finish_reason": reason, "branch": branch,
            })
            tokens += len(seq)
        if len(buffer) >= cfg.shard_size:
            _write_shard(out, buffer, rank)
            buffer = []
        bar.update(len(batch))
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(tok_s=f"{tokens / elapsed:.1f}")
    if buffer:
        _write_shard(out, buffer, rank)
    bar.close()
    return tokens


def collect(model: Any, records: list[PromptRecord], out_dir: str | Path, cfg: CollectConfig | None = None, *,
            accelerator: Any = None, progress: bool = True, overwrite_mismatch: bool = False) -> CollectSummary:
    """Generate AR targets for every prompt not yet in out_dir; returns the run's summary."""
    cfg = cfg or CollectConfig()
    cfg.validate(model.tokenizer)
    if cfg.max_new_tokens >= model.max_positions:
        raise CollectError(f"max_new_tokens={cfg.max_new_tokens}: the model holds {model.max_positions} positions "
                           "in all, prompt included; give fewer")
    out = Path(out_dir)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    if cfg.backend == "vllm" and world > 1:
        raise CollectError("backend='vllm' runs one engine over all GPUs (tensor_parallel_size): launch one "
                           "process")
    generate = open_generator(cfg)  # before anything is written: a missing vLLM fails here
    is_main = rank == 0
    t0 = time.perf_counter()
    summary = CollectSummary(prompts_total=len(records))
    fingerprint = generator_fingerprint(model, cfg)
    meta_path = out / META_FILE
    if meta_path.exists():
        old = read_collect_meta(meta_path)["fingerprint"]
        if old != fingerprint and not overwrite_mismatch:
            diff = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
            raise CollectError(f"{out}: already holds targets from a different generator (differs in {diff}); "
                               "use another output folder")
    try:
        writable_dir(out / SHARD_DIR)
    except ConfigError as err:
        raise CollectError(str(err)) from err
    with _writer_lock(out, rank):
        prepared = prepare(model, records, cfg, summary)
        done = _done_ids(out, prepared)
        summary.done_before = sum(1 for p in prepared if p.record.id in done)
        everything_done = summary.done_before == len(prepared)
        if is_main and not (everything_done and meta_path.exists()):
            _write_meta(out, fingerprint, summary, complete=False)  # a finished folder stays marked finished
        if accelerator is not None:
            accelerator.wait_for_everyone()
        pending = [p for p in prepared if p.record.id not in done][rank::world]
        pending.sort(key=lambda p: len(p.ids))
        try:
            tokens = _collect_pending(model, pending, cfg, out, rank, generate, summary, progress, t0)
        finally:
            if isinstance(generate, VLLMGenerator):
                generate.close()
    summary.generated = len(pending)
    summary.target_tokens = tokens
    if accelerator is not None:
        accelerator.wait_for_everyone()
        summary.generated = int(accelerator.reduce(_tensor(summary.generated, accelerator), "sum"))
        summary.target_tokens = int(accelerator.reduce(_tensor(tokens, accelerator), "sum"))
        summary.thinking_capped = int(accelerator.reduce(_tensor(summary.thinking_capped, accelerator), "sum"))
    summary.wall_s = time.perf_counter() - t0
    if is_main:
        _write_meta(out, fingerprint, summary, complete=True)
    return summary


@contextlib.contextmanager
def _writer_lock(out: Path, rank: int) -> Iterator[None]:
    """One collect writes a folder at a time (per rank): a second is refused with the holder's pid. The kernel
    releases the lock when its holder dies, so a killed collect never blocks the rerun."""
    path = out / f".collect.lock.{rank}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise CollectError(f"{out}: another collect (pid {holder}) is writing this folder; wait for it or use "
                               "another --out") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def read_collect_meta(path: Path) -> dict[str, Any]:
    """nld_collect.json; a damaged one is an error that names the file and what is wrong."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CollectError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    fingerprint = meta.get("fingerprint") if isinstance(meta, dict) else None
    if not isinstance(fingerprint, dict) or "weights_hash" not in fingerprint:
        raise CollectError(f"{path}: not a collection record (needs a 'fingerprint' object with 'weights_hash')")
    return meta


def _tensor(value: int, accelerator: Any):
    import torch

    return torch.tensor(value, device=accelerator.device)


def _write_meta(out: Path, fingerprint: dict, summary: CollectSummary, complete: bool) -> None:
    meta = {"fingerprint": fingerprint, "complete": complete, "summary": asdict(summary)}
    tmp = out / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_FILE)


def collection_meta(out: Path, allow_incomplete: bool = False) -> dict[str, Any]:
    """The folder's collection metadata; an error when it is no collection, or (unless allow_incomplete) one that
    did not finish."""
    meta_path = out / META_FILE
    if not meta_path.exists():
        raise CollectError(f"{out}: not a collected dataset (no {META_FILE}); run `nld-lora collect` first")
    meta = read_collect_meta(meta_path)
    if not meta.get("complete", True) and not allow_incomplete:
        raise CollectError(f"{out}: the collection did not finish (killed or failed): rerun the same `nld-lora "
                           "collect` to complete it, or train on what is there with allow_incomplete_data=true")
    return meta


def load_collected(out_dir: str | Path, *, model: Any = None, allow_incomplete: bool = False):
    """The collected targets as a datasets.Dataset (one row per prompt id, sorted; a `branch` column, 0 for a
    prompt's own answer, n for its n-th branch; collections from before branches get 0s); checks the
    fingerprint, and that the collection finished unless allow_incomplete."""
    from datasets import Dataset

    out = Path(out_dir)
    meta = collection_meta(out, allow_incomplete)
    if model is not None and meta["fingerprint"]["weights_hash"] != model.weights_hash:
        raise CollectError(
            f"{out}: targets were generated by {meta['fingerprint']['model']} (weights {meta['fingerprint']['weights_hash']})"
            f" but the model is {model.name_or_path} (weights {model.weights_hash}); re-collect for this model"
        )
    shards = sorted(str(p) for p in (out / SHARD_DIR).glob("*.parquet"))
    if not shards:
        raise CollectError(f"{out}: no shards in {SHARD_DIR}/")
    ds = Dataset.from_parquet(shards)
    first: dict[str, int] = {}
    for i, pid in enumerate(ds["prompt_id"]):
        first.setdefault(pid, i)
    ds = ds.select([first[pid] for pid in sorted(first)])
    if "branch" not in ds.column_names:
        ds = ds.add_column("branch", [0] * len(ds))
    return ds

