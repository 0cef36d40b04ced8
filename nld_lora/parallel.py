"""Processes and devices for every entry point: one Accelerator setup (recipe, trainer, CLI), launch checks, the
data-parallel layout a run actually got, and process-group teardown.

A rank that exits with its gloo/NCCL group still alive can abort (SIGABRT) while the interpreter tears down the
group's worker threads, so every entry point ends the group explicitly before it returns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nld_lora.config_io import ConfigError


def mixed_precision_for(setting: str) -> str:
    """'auto' -> bf16 on a CUDA device that has it, else no mixed precision."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def fsdp_requested() -> bool:
    """`accelerate launch --use_fsdp` (or a config file with distributed_type FSDP) sets ACCELERATE_USE_FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def make_accelerator(*, mixed_precision: str = "auto", grad_accum: int = 1, wandb: bool = False,
                     wandb_mode: str = "offline", project_dir: str | Path | None = None, cpu: bool | None = None):
    """The Accelerator every stage runs under: CPU when there is no CUDA device, trackers only when asked, wandb
    offline unless WANDB_MODE or `wandb_mode` says otherwise; refuses a launch that is not one distributed job."""
    from accelerate import Accelerator

    if wandb:
        os.environ.setdefault("WANDB_MODE", wandb_mode)
    on_cpu = not torch.cuda.is_available() if cpu is None else cpu
    fsdp_dropped = fsdp_requested() and (on_cpu or not torch.cuda.is_available())
    if fsdp_dropped:  # accelerate's FSDP plugin refuses a CPU-only run; data parallel is what can run here
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=mixed_precision_for(mixed_precision),
                              gradient_accumulation_steps=grad_accum, log_with=["wandb"] if wandb else None,
                              project_dir=None if project_dir is None else str(project_dir))
    check_launch(accelerator, fsdp_dropped)
    if on_cpu:
        set_cpu_threads()
    if fsdp_dropped:
        accelerator.print(f"note: FSDP was asked for, but accelerate shards only on GPUs; this run is "
                          f"{parallelism(accelerator)} with {accelerator.num_processes} process(es) instead")
    return accelerator


def cpu_threads() -> int | None:
    """Torch threads for this process on CPU, or None to leave them. `NLD_LORA_NUM_THREADS` decides when set.
    Otherwise, under `accelerate launch`, which pins OMP_NUM_THREADS=1 unless given --cpu or
    --num_cpu_threads_per_process (measured: one thread made the default recipe's training steps 1.7x slower on
    2 cores), every usable core split between this machine's processes."""
    if os.environ.get("NLD_LORA_NUM_THREADS"):
        return int(os.environ["NLD_LORA_NUM_THREADS"])
    launched = any(k.startswith("ACCELERATE_") for k in os.environ)
    if not (launched and os.environ.get("OMP_NUM_THREADS") == "1"):
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, len(os.sched_getaffinity(0)) // local)


def set_cpu_threads() -> None:
    threads = cpu_threads()
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def check_launch(accelerator: Any, fsdp_asked: bool) -> None:
    """Several processes that are not one process group (each would believe it is rank 0 and write the same
    files) are refused before anything is written."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        hint = (" FSDP through accelerate needs GPUs; on CPU launch data parallel with "
                "`accelerate launch --cpu --num_processes N`." if fsdp_asked else "")
        raise ConfigError(f"started as {world} processes (WORLD_SIZE={world}) that are not one distributed job "
                          f"(accelerate set up a single process, {accelerator.distributed_type}); they would write "
                          f"the same output folder.{hint}")


def parallelism(accelerator: Any) -> str:
    """'fsdp', 'ddp' or 'single': what the run does, whatever was asked for."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def finish_processes(*, barrier: bool = True) -> None:
    """Wait for every rank (unless `barrier` is False, e.g. on an error path), then destroy the process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
