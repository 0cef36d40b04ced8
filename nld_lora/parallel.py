"""Process-group teardown for entry points run under `accelerate launch` or torchrun.

A rank that exits with its gloo/NCCL group still alive can abort (SIGABRT) while the interpreter tears down the
group's worker threads, so every entry point ends the group explicitly before it returns.
"""

from __future__ import annotations


def finish_processes(*, barrier: bool = True) -> None:
    """Wait for every rank (unless `barrier` is False, e.g. on an error path), then destroy the process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
