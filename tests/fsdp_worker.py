"""One rank of the FSDP2 check (tests/test_distributed.py launches two over gloo): the trainer's eval, adapter
save and a training step on a model sharded with torch's `fully_shard`, the way accelerate's FSDP2 prepare shards
it on GPUs (each decoder layer, then the root). Usage: python -m torch.distributed.run --nproc_per_node 2
tests/fsdp_worker.py COLLECTED_DIR OUT_DIR"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import nld_lora
from nld_lora.adapter.attach import add_lora
from nld_lora.adapter.saving import adapter_state, save_adapter
from nld_lora.train.trainer import evaluate_drafts, setup_data
from tests.helpers import fsdp_check_config, fsdp_check_inputs

EMBEDDED = str(Path(__file__).resolve().parents[1] / "data" / "tiny-nld-code")


def main(collected: str, out: str) -> None:
    dist.init_process_group("gloo")
    acc = Accelerator(cpu=True)
    cfg = fsdp_check_config()
    set_seed(cfg.seed)
    model = nld_lora.load(EMBEDDED)
    _, eval_seqs = setup_data(model, collected, cfg)
    peft_model = add_lora(model, cfg)
    for layer in model.encoder.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    draft_len = cfg.draft_len
    before = evaluate_drafts(model, eval_seqs, cfg, draft_len, adapter="default", accelerator=acc)
    state = adapter_state(peft_model)
    if acc.is_main_process:
        save_adapter(peft_model, Path(out) / "adapter_init", model, cfg, draft_len, {}, state)
    # one optimizer step on a loss through the sharded root: every rank must end with the same full LoRA tensors
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    opt = torch.optim.SGD(params, lr=1.0)
    for p in params:
        p.requires_grad_(True)
    with model.adapter_enabled("default", True):
        logits, _ = model(**fsdp_check_inputs(acc.process_index))
        logits.float().logsumexp(-1).mean().backward()
    opt.step()
    stepped = adapter_state(peft_model)
    gathered = [None] * acc.num_processes
    dist.all_gather_object(gathered, {k: v.sum().item() for k, v in stepped.items()})
    after = evaluate_drafts(model, eval_seqs, cfg, draft_len, adapter="default", accelerator=acc)
    if acc.is_main_process:
        save_adapter(peft_model, Path(out) / "adapter_stepped", model, cfg, draft_len, {}, stepped)
        (Path(out) / "result.json").write_text(json.dumps({
            "world": acc.num_processes, "sharded_params": len(sharded), "eval_before": before, "eval_after": after,
            "ranks_agree": all(g == gathered[0] for g in gathered),
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
