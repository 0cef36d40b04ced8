"""LoRA training loop on accelerate (devices, DDP/FSDP, mixed precision, accumulation, checkpoints, trackers).

Why accelerate and not a transformers/TRL Trainer subclass: one step runs two passes with different adapter
states over a shared KV cache (teacher off, student on), batches are built from draft starts rather than a
collator, and checkpoints are selected by a walk of the deployed loop; a plain loop on accelerate says this directly.
We reuse transformers' schedulers, PEFT for the adapter and accelerate's state save/load and trackers.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nld_lora.adapter.attach import TRAINING_ADAPTER as ADAPTER_NAME
from nld_lora.adapter.attach import add_lora, lora_enabled
from nld_lora.adapter.saving import adapter_state, save_adapter
from nld_lora.config_io import ConfigError, to_dict, writable_dir
from nld_lora.decoding.settings import resolve_draft_len
from nld_lora.model.quantize import quantized_twin
from nld_lora.parallel import make_accelerator, parallelism
from nld_lora.train.config import TrainConfig
from nld_lora.train.data import Sequence, build_sequences, make_batch, split_eval
from nld_lora.train.objective import (
    DraftLossOutput,
    deployed_walk,
    draft_loss,
    follow_up_batch,
    greedy_acceptance,
    row_validity,
    sample_starts,
    simulated_acceptance,
    student_logits,
    teacher_pass,
)

FINAL_ADAPTER = "linear_spec_lora"
STATE_FILE = "trainer_state.json"


@dataclass(kw_only=True)
class TrainResult:
    adapter_dir: str
    best_step: int
    best_simulated_acceptance: float  # simulated acceptance of the kept adapter (kept by cfg.select_by)
    baseline_simulated_acceptance: float
    steps: int
    wall_s: float
    world_size: int = 1
    parallelism: str = "single"  # what the run did: single | ddp | fsdp (nld_lora.parallel.parallelism)
    fit_baseline_simulated_acceptance: float | None = None  # on training sequences (fit), without the adapter
    fit_best_simulated_acceptance: float | None = None  # the same with the selected adapter
    deployed_baseline: float | None = None  # tokens per cycle of the deployed loop on the eval split, no adapter
    deployed_best: float | None = None  # the same with the selected adapter (what the report's gain estimates)


@torch.no_grad()
def evaluate_drafts(model, seqs: list[Sequence], cfg: TrainConfig, draft_len: int, *, adapter: str | None,
                    batch_size: int = 8, accelerator: Any = None, walk: bool = True) -> dict[str, Any]:
    """Simulated acceptance on held-out sequences at fixed (seeded) draft starts, same passes as training, and
    deployed acceptance (walk=True): tokens per cycle of the cycles greedy self-speculation runs over the same
    targets, which is what the report measures (uniform starts over-weight the long easy stretches a cycle crosses
    at once).

    Collective under several processes: every rank draws the same batches, runs every world_size-th one (ranks
    with fewer run a discarded extra batch, so sharded models see the same number of forwards on every rank) and
    the counts are summed, so the figures equal a single-process run's.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    gen = torch.Generator().manual_seed(cfg.seed + 99991)
    pad = model.config.pad_token_id or 0
    batches = [make_batch(seqs[i:i + batch_size], cfg.eval_blocks_per_seq, draft_len, gen, pad, model.device,
                          cfg.draft_layout) for i in range(0, len(seqs), batch_size)]
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    counts = torch.zeros(2 * draft_len + 4, dtype=torch.float64)  # attempts, accepts, sum of lengths, blocks,
    # deployed walk: committed tokens, cycles
    for j in range(rounds):
        batch = mine[j] if j < len(mine) else batches[0]
        teacher = teacher_pass(model, batch, adapter, span=walk)
        commits = torch.zeros(0)
        with lora_enabled(model, adapter, on=True):
            student = student_logits(model, batch, teacher.cache, model.mask_token_id)
            if walk:
                _, commits = deployed_walk(model, batch, teacher, model.mask_token_id,
                                           keep_going=walk_sync(accelerator))
        out = draft_loss(student, teacher.blocks(batch), row_validity(batch), position_weighting="uniform",
                         distill="none")
        if j < len(mine):
            counts += torch.cat([out.position_attempts.cpu(), out.position_accepts.cpu(),
                                 torch.tensor([out.accept_lengths.sum().item(), len(out.accept_lengths),
                                               commits.sum().item(), (commits > 0).sum().item()])]).double()
    if world > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
    attempts, accepts = counts[:draft_len].long(), counts[draft_len:2 * draft_len].long()
    deployed = {"deployed_acceptance": float(counts[-2] / counts[-1].clamp(min=1))} if walk else {}
    return {
        "simulated_acceptance": simulated_acceptance(attempts, accepts),
        **deployed,
        "mean_block_acceptance": float(counts[-4] / counts[-3].clamp(min=1)),
        "per_position": (accepts.double() / attempts.double().clamp(min=1)).tolist(),
        "blocks": int(counts[-3]),
    }


def walk_sync(accelerator: Any) -> Callable[[bool], bool]:
    """keep_going for deployed_walk: under several processes every rank runs as many walk forwards as the one
    with the longest walk (sharded models gather weights in every forward)."""
    if accelerator is None or accelerator.num_processes == 1:
        return bool

    def any_rank(flag: bool) -> bool:
        return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)

    return any_rank


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(p for p in ckpt_dir.glob("step_*") if (p / STATE_FILE).exists())
    return found[-1] if found else None


def _config_key(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("stop_at_step", "wandb", "wandb_mode", "log_every")}


@dataclass
class TrainState:
    """Everything a resumed run needs besides the accelerate state; saved as trainer_state.json per checkpoint."""

    step: int = 0
    best: float | None = None  # best selection metric (cfg.select_by) on the eval split so far
    best_step: int = 0
    baseline: float | None = None  # the same metric without the adapter
    deployed_baseline: float | None = None  # deployed acceptance on the eval split without the adapter
    fit_baseline: float | None = None  # the same on the fit sample of training sequences
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        """A checkpoint's trainer_state.json; a damaged one is an error that names it (delete that checkpoint)."""
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object, found {type(raw).__name__}")
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise ConfigError(f"{path}: not a valid trainer state ({err}); delete the checkpoint folder "
                              f"{path.parent.name} to resume from the one before") from err


@dataclass(kw_only=True)
class TrainingRun:
    """What the setup functions build for the loop."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    model: Any
    peft: Any  # the PeftModel around `model` (adapter switching, saving)
    wrapped: Any  # `model` as accelerate prepared it (DDP / FSDP): training forwards and backward go through it
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    train_seqs: list[Sequence]
    eval_seqs: list[Sequence]  # held-out groups: selects the adapter (transfer)
    fit_seqs: list[Sequence]  # a sample of training sequences (fit); empty when cfg.fit_eval is off
    draft_len: int
    state: TrainState

    @property
    def log_path(self) -> Path:
        return self.out / "train_log.jsonl"


def setup_accelerator(cfg: TrainConfig, out: Path):
    """The Accelerator for training, and for the whole recipe (nld_lora.parallel.make_accelerator)."""
    return make_accelerator(mixed_precision=cfg.mixed_precision, grad_accum=cfg.grad_accum, wandb=cfg.wandb,
                            wandb_mode=cfg.wandb_mode, project_dir=out)


def setup_data(model, dataset_dir: str | Path, cfg: TrainConfig) -> tuple[list[Sequence], list[Sequence]]:
    """Collected targets -> training sequences, split by hashed prompt id into train and eval."""
    from nld_lora.data.collect import load_collected

    seqs = build_sequences(load_collected(dataset_dir, model=model, allow_incomplete=cfg.allow_incomplete_data),
                           cfg.max_seq_len,
                           max_target=cfg.max_target_tokens)
    if len(seqs) < 2:
        raise ConfigError(f"{dataset_dir}: needs at least 2 collected sequences with targets; found {len(seqs)}")
    train_seqs, eval_seqs = split_eval(seqs, cfg.eval_fraction, cfg.seed, by=cfg.eval_split)
    eval_seqs = [s for s in eval_seqs if not s.branch]  # selection measures prompts' own answers, as deployed
    return train_seqs, eval_seqs[: cfg.eval_max_seqs]


def fit_sample(train_seqs: list[Sequence], n: int, seed: int) -> list[Sequence]:
    """A seeded sample of training sequences, as many as the eval split: the fit side of fit vs transfer."""
    order = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(seed + 7)).tolist()
    return [train_seqs[i] for i in order[:n]]


def setup_optimization(model, cfg: TrainConfig, accelerator):
    """AdamW over the LoRA parameters and a transformers scheduler, prepared by accelerate with the model (the
    tri-mode model itself, not its PEFT wrapper, is the DDP/FSDP root, so every forward runs its hooks)."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    name = {"cosine": "cosine", "wsd": "warmup_stable_decay", "constant": "constant_with_warmup"}[cfg.scheduler]
    extra = {"num_decay_steps": max(cfg.steps // 5, 1)} if cfg.scheduler == "wsd" else None
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * cfg.steps),
                              num_training_steps=cfg.steps, scheduler_specific_kwargs=extra)
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP replaces them with sharded ones
    return wrapped, optimizer, scheduler, params


def resume_state(accelerator, out: Path, cfg: TrainConfig) -> TrainState:
    """The latest checkpoint's state (accelerate state restored too), or a fresh one; other settings fail."""
    state = TrainState(config=_config_key(cfg))
    latest = _latest_checkpoint(out / "checkpoints")
    if latest is None:
        return state
    saved = TrainState.load(latest / STATE_FILE)
    defaults = _config_key(TrainConfig())  # a setting added since the checkpoint was written had its default
    if {**defaults, **saved.config} != state.config:
        diff = sorted(k for k in state.config if saved.config.get(k, defaults.get(k)) != state.config[k])
        raise ConfigError(f"{out}: holds checkpoints of a run with other settings ({diff}); "
                          "use a new output folder or delete its checkpoints/")
    accelerator.load_state(str(latest))
    accelerator.print(f"resumed from {latest} (step {saved.step})")
    return saved


def setup(model_or_path: Any, dataset_dir: str | Path, out_dir: str | Path, cfg: TrainConfig,
          accelerator: Any = None) -> TrainingRun:
    from accelerate.utils import set_seed

    import nld_lora

    out = writable_dir(out_dir)
    accelerator = accelerator or setup_accelerator(cfg, out)
    set_seed(cfg.seed)
    if isinstance(model_or_path, (str, Path)):
        model = nld_lora.load(str(model_or_path), device=accelerator.device, quantization=cfg.quantization)
    elif cfg.quantization is not None and model_or_path.quantization != cfg.quantization:
        model = quantized_twin(model_or_path.to(accelerator.device), cfg.quantization)
    else:
        model = model_or_path.to(accelerator.device)
    train_seqs, eval_seqs = setup_data(model, dataset_dir, cfg)
    peft_model = add_lora(model, cfg)
    try:
        wrapped, optimizer, scheduler, params = setup_optimization(model, cfg, accelerator)
        if cfg.wandb:
            accelerator.init_trackers(cfg.wandb_project, config=to_dict(cfg), init_kwargs={"wandb": {"dir": str(out)}})
        out.mkdir(parents=True, exist_ok=True)
        state = resume_state(accelerator, out, cfg)
    except BaseException:
        model.detach_adapter(ADAPTER_NAME)  # e.g. checkpoints of other settings: the caller's model stays clean
        raise
    fit_seqs = fit_sample(train_seqs, len(eval_seqs), cfg.seed) if cfg.fit_eval else []
    draft_len = resolve_draft_len(model.block_size, cfg.draft_len, quadratic=cfg.draft_layout == "quadratic")
    return TrainingRun(cfg=cfg, out=out, accelerator=accelerator, model=model, peft=peft_model, wrapped=wrapped,
                       optimizer=optimizer, scheduler=scheduler, params=params, train_seqs=train_seqs,
                       eval_seqs=eval_seqs, fit_seqs=fit_seqs, draft_len=draft_len, state=state)


def run_eval(run: TrainingRun, step: int) -> None:
    """Simulated acceptance on the eval split (every process takes part); the best adapter so far goes to
    best_adapter/ (gathered on every process, written by the main one)."""
    st, acc = run.state, run.accelerator

    def measure(seqs: list[Sequence], adapter: str | None, walk: bool = True) -> dict[str, Any]:
        return evaluate_drafts(run.model, seqs, run.cfg, run.draft_len, adapter=adapter, accelerator=acc, walk=walk)

    metrics = measure(run.eval_seqs, ADAPTER_NAME)
    if st.baseline is None:
        base = measure(run.eval_seqs, None)
        st.baseline, st.deployed_baseline = base["simulated_acceptance"], base["deployed_acceptance"]
    metrics["deployed_baseline"] = st.deployed_baseline
    if run.fit_seqs:
        metrics["fit_simulated_acceptance"] = measure(run.fit_seqs, ADAPTER_NAME, False)["simulated_acceptance"]
        if st.fit_baseline is None:
            st.fit_baseline = measure(run.fit_seqs, None, False)["simulated_acceptance"]
        metrics["fit_baseline_simulated_acceptance"] = st.fit_baseline
    record = {"step": step, "eval": True, **{k: v for k, v in metrics.items() if k != "per_position"}}
    if acc.is_main_process:
        _log(acc, run.log_path, record)
    selected = metrics[f"{run.cfg.select_by}_acceptance"]
    if st.best is None or selected > st.best:
        st.best, st.best_step = selected, step
        state = adapter_state(run.peft)
        if acc.is_main_process:
            save_adapter(run.peft, run.out / "best_adapter", run.model, run.cfg, run.draft_len,
                         {"step": step, "eval": metrics, "baseline_simulated_acceptance": st.baseline}, state)
    st.history.append(record)
    acc.wait_for_everyone()


def student_loss(run: TrainingRun, batch, cache, teacher) -> tuple[DraftLossOutput, torch.Tensor]:
    """The student's drafts over the teacher's cache and the objective; call with the adapter on."""
    cfg = run.cfg
    with run.accelerator.autocast():
        student = student_logits(run.wrapped, batch, cache, run.model.mask_token_id)
        res = draft_loss(student, teacher, row_validity(batch), ce_weight=cfg.ce_weight,
                         distill_weight=cfg.distill_weight, distill=cfg.distill,
                         distill_temperature=cfg.distill_temperature, top=cfg.distill_top,
                         position_weighting=cfg.position_weighting, first_position_weight=cfg.first_position_weight)
    return res, student


def train_step(run: TrainingRun) -> DraftLossOutput:
    """One optimizer step (grad_accum micro-batches); every process draws its share of the same seeded picks."""
    cfg, acc, step = run.cfg, run.accelerator, run.state.step
    rank, world = acc.process_index, acc.num_processes
    pad = run.model.config.pad_token_id or 0
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    picks = torch.randint(0, len(run.train_seqs), (cfg.grad_accum, cfg.batch_size * world), generator=gen)
    for micro in range(cfg.grad_accum):
        mine = [run.train_seqs[int(i)] for i in picks[micro, rank::world]]
        batch = make_batch(mine, cfg.blocks_per_seq, run.draft_len, gen, pad, acc.device, cfg.draft_layout)
        with acc.accumulate(run.wrapped):
            teacher = teacher_pass(run.model, batch, ADAPTER_NAME, span=cfg.follow_up_blocks or cfg.on_policy_blocks)
            with lora_enabled(run.model, ADAPTER_NAME, on=True):  # backward too: PEFT clears requires_grad of
                targets = teacher.blocks(batch)  # a disabled adapter, and its gradients would be lost
                res, student = student_loss(run, batch, teacher.cache, targets)
                extra = []
                if cfg.follow_up_blocks:
                    extra.append(follow_up_batch(batch, greedy_acceptance(student.detach(), targets,
                                                                          row_validity(batch))))
                if cfg.on_policy_blocks:
                    walked, _ = deployed_walk(run.model, batch, teacher, run.model.mask_token_id,
                                              keep_going=walk_sync(acc))
                    extra.append(replace(batch, starts=sample_starts(walked, cfg.blocks_per_seq, gen)))
                loss = res.loss
                for more in extra:
                    loss = loss + student_loss(run, more, teacher.cache, teacher.blocks(more))[0].loss
                acc.backward(loss / (1 + len(extra)))
            if acc.sync_gradients:
                acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
    return res


def _run_loop(run: TrainingRun, progress: bool) -> float:
    """Steps with logging, evaluation and checkpoints until stop; the final adapter once all steps are done.
    Returns the loop's wall time."""
    cfg, acc, st = run.cfg, run.accelerator, run.state
    t0 = time.perf_counter()
    if st.step == 0:
        run_eval(run, 0)
    stop = min(cfg.steps, cfg.stop_at_step or cfg.steps)
    bar = tqdm(total=cfg.steps, initial=st.step, desc="train", unit="step",
               disable=not (progress and acc.is_main_process))
    while st.step < stop:
        res = train_step(run)
        st.step += 1
        bar.update(1)
        if st.step % cfg.log_every == 0 and acc.is_main_process:
            mean_acc = float(res.accept_lengths.float().mean()) if len(res.accept_lengths) else 0.0
            record = {"step": st.step, "loss": res.loss.item(), "ce": float(res.ce), "distill": float(res.distill),
                      "train_acceptance": mean_acc, "lr": run.scheduler.get_last_lr()[0]}
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{mean_acc:.2f}")
            _log(acc, run.log_path, record)
        if st.step % cfg.eval_every == 0 or st.step == cfg.steps:
            run_eval(run, st.step)
        if st.step % cfg.save_every == 0 or st.step == stop:
            _save_state(acc, run.out / "checkpoints", st)
    bar.close()
    wall = time.perf_counter() - t0
    final = run.out / FINAL_ADAPTER
    if st.step >= cfg.steps and acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(run.out / "best_adapter", final)
    acc.wait_for_everyone()
    for tracker in acc.trackers:
        tracker.finish()
    return wall


def train(model_or_path: Any, dataset_dir: str | Path, out_dir: str | Path, cfg: TrainConfig | None = None,
          *, progress: bool = True, accelerator: Any = None) -> TrainResult:
    """Train the draft LoRA on collected targets; resumes from out_dir/checkpoints; returns the best adapter.

    A model passed in comes back as it was (the training adapter is unloaded at the end).
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    run = setup(model_or_path, dataset_dir, out_dir, cfg, accelerator)
    try:
        wall = _run_loop(run, progress)
    finally:
        run.model.detach_adapter(ADAPTER_NAME)  # the caller's model comes back clean, also after an error
        run.model.eval()
    acc, st = run.accelerator, run.state
    final = run.out / FINAL_ADAPTER
    best = next((r for r in st.history if r["step"] == st.best_step), {})
    return TrainResult(adapter_dir=str(final), best_step=st.best_step,
                       best_simulated_acceptance=best.get("simulated_acceptance", 0.0),
                       baseline_simulated_acceptance=st.baseline or 0.0, steps=st.step, wall_s=wall,
                       world_size=acc.num_processes, parallelism=parallelism(acc),
                       fit_baseline_simulated_acceptance=st.fit_baseline,
                       fit_best_simulated_acceptance=best.get("fit_simulated_acceptance"),
                       deployed_baseline=st.deployed_baseline, deployed_best=best.get("deployed_acceptance"))


def _save_state(accelerator, ckpt_dir: Path, state: TrainState) -> None:
    """accelerate state + trainer_state.json (written last: a checkpoint without it is ignored on resume)."""
    path = ckpt_dir / f"step_{state.step:07d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        for old in sorted(ckpt_dir.glob("step_*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _log(accelerator, path: Path, record: dict) -> None:
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
