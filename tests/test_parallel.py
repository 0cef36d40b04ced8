"""Entry-point teardown: the process group is gone after finish_processes, and it is a no-op without one."""

import os

import torch.distributed as dist

from nld_lora.parallel import finish_processes


def test_finish_processes_destroys_the_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    finish_processes()
    assert not dist.is_initialized()
    finish_processes()


def test_cpu_threads_undo_accelerates_one_thread_pin(monkeypatch):
    from nld_lora.parallel import cpu_threads

    for key in [k for k in os.environ if k.startswith("ACCELERATE_")] + ["NLD_LORA_NUM_THREADS", "LOCAL_WORLD_SIZE"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads() is None  # not launched by accelerate: the user's setting stands
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads() == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # --num_cpu_threads_per_process 3: left as given
    assert cpu_threads() is None
    monkeypatch.setenv("NLD_LORA_NUM_THREADS", "5")
    assert cpu_threads() == 5
