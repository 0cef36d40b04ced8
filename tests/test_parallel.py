"""Entry-point teardown: the process group is gone after finish_processes, and it is a no-op without one."""

import torch.distributed as dist

from nld_lora.parallel import finish_processes


def test_finish_processes_destroys_the_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    finish_processes()
    assert not dist.is_initialized()
    finish_processes()
