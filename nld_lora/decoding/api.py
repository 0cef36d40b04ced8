"""generate(): the one decoding entry point used by collection, training-time evaluation and reports."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from nld_lora.adapter.attach import LoadedAdapter, check_lora_mode
from nld_lora.adapter.twins import compile_module, decode_encoders, decode_state
from nld_lora.decoding.batch import DecodeBatch
from nld_lora.decoding.loops import run_ar, run_diffusion, run_self_spec, run_self_spec_quadratic
from nld_lora.decoding.outputs import Outputs
from nld_lora.decoding.settings import DecodeSettings, resolve_draft_len
from nld_lora.decoding.stats import GenerationStats

MODES = ("ar", "diffusion", "self_spec", "self_spec_quadratic")
SPEC_MODES = ("self_spec", "self_spec_quadratic")
COMPILE_MODES = (False, True, "reduce-overhead")
STATIC_CAPACITY_STEP = 256
LOOPS = {"ar": run_ar, "diffusion": run_diffusion, "self_spec": run_self_spec,
         "self_spec_quadratic": run_self_spec_quadratic}


@dataclass
class GenerationResult:
    sequences: list[list[int]]
    texts: list[str] | None
    stats: GenerationStats
    prompt_ids: list[list[int]]
    settings: DecodeSettings  # as resolved for this call (block_size and draft_len filled in)

    @property
    def finish_reasons(self) -> list[str]:
        return [r.finish_reason for r in self.stats.requests]

    @classmethod
    def concat(cls, parts: list[GenerationResult]) -> GenerationResult:
        """The results of generate calls on consecutive prompt chunks as one call's (settings: the first part's;
        texts only when every part has them)."""
        if not parts:
            raise ValueError("concat needs at least one GenerationResult")
        texts = None if any(p.texts is None for p in parts) else [t for p in parts for t in p.texts]
        return cls([s for p in parts for s in p.sequences], texts,
                   GenerationStats.concat([p.stats for p in parts]), [i for p in parts for i in p.prompt_ids],
                   parts[0].settings)


def normalize_prompts(model, prompts_or_ids: Any, add_special_tokens: bool = True) -> list[list[int]]:
    """Strings (tokenized), one id list, a list of id lists, or a 1D/2D tensor -> list of id lists."""
    if isinstance(prompts_or_ids, torch.Tensor):
        t = prompts_or_ids
        return [t.tolist()] if t.dim() == 1 else [row.tolist() for row in t]
    if isinstance(prompts_or_ids, str):
        prompts_or_ids = [prompts_or_ids]
    if not isinstance(prompts_or_ids, (list, tuple)) or not prompts_or_ids:
        raise ValueError("prompts_or_ids must be a non-empty string, list of strings, or list of token-id lists")
    if all(isinstance(x, int) for x in prompts_or_ids):
        return [list(prompts_or_ids)]
    out = []
    for i, p in enumerate(prompts_or_ids):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError(f"prompt {i} is text but the model has no tokenizer; pass token ids")
            out.append(model.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
        else:
            out.append([int(x) for x in p])
    return out


def lookahead(mode: str, block: int, draft_len: int) -> int:
    """Slots a mode may write past the last kept token (the block or draft it runs ahead)."""
    return {"ar": 1, "diffusion": block, "self_spec": draft_len + 1,
            "self_spec_quadratic": (draft_len + 1) * (draft_len + 2)}[mode]


def max_prompt_tokens(model, mode: str, max_new_tokens: int, *, block_size: int | None = None,
                      draft_len: int | None = None) -> int:
    """The longest prompt `generate` accepts for this mode and budget (same defaults as generate)."""
    block = block_size or model.block_size
    return model.max_positions - max_new_tokens - lookahead(mode, block, resolve_draft_len(block, draft_len, mode == "self_spec_quadratic"))


def _validate(model, prompts: list[list[int]], mode: str, max_new_tokens: int, cfg: DecodeSettings) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0; got {max_new_tokens}")
    limit = model.max_positions
    if not 1 <= cfg.draft_len < limit:
        raise ValueError(f"draft_len must be in [1, {limit}) (the model's max positions); got {cfg.draft_len}")
    ahead = lookahead(mode, cfg.block_size, cfg.draft_len)
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if any(not 0 <= t < vocab for t in p):
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
        if len(p) + max_new_tokens + ahead > limit:
            raise ValueError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} + lookahead {ahead} exceeds "
                f"the model's {limit} positions"
            )


def _pick_adapter(model, adapter: str | bool | None) -> str | None:
    if adapter is False:
        return None
    if adapter is None or adapter is True:
        return model.active_adapter
    if adapter not in model.adapters:
        raise ValueError(f"adapter {adapter!r} is not loaded; loaded: {sorted(model.adapters)}")
    return adapter


@torch.no_grad()
def generate(
    model,
    prompts_or_ids: Any,
    *,
    mode: str = "ar",
    max_new_tokens: int = 128,
    settings: DecodeSettings | None = None,
    adapter: str | bool | None = None,
    lora_mode: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    add_special_tokens: bool = True,
    profile: bool = False,
    compile: bool | str = False,
    **decode: Any,
) -> GenerationResult:
    """Decode prompts with mode "ar", "diffusion", "self_spec" (linear: a draft forward, then a verify forward) or
    "self_spec_quadratic" (one forward verifies and drafts); metrics as in docs/design.md.

    settings: a DecodeSettings; its fields may also be given (or overridden) as keywords (temperature=, top_k=,
    top_p=, block_size=, threshold=, policy=, max_steps=, draft_len= (an integer or "auto"), acceptance=, ngram=,
    seed=).
    adapter: None uses the active adapter (if any), False none, a name selects a loaded adapter; lora_mode None
    uses that adapter's own mode. draft_len defaults to the adapter's trained one when it was trained for this
    mode's draft layout, else block_size - 1 (single-forward mode: min(3, block_size - 1)).
    Greedy self-speculation (either mode) emits exactly AR's tokens. profile=True times every model forward (synchronising a GPU), so
    stats.forward_s and stats.overhead_share tell how much of the wall time the runtime itself costs.
    compile=True runs the backbone's decode forwards through torch.compile (dynamic shapes; the first call per shape
    family compiles, later calls in the process reuse it): it removes most per-op overhead of small models.
    compile="reduce-overhead" (GPU) adds CUDA graphs: the KV cache then keeps static shapes (attention spans the
    whole capacity, rounded up to STATIC_CAPACITY_STEP slots so calls share graphs).
    """
    prompts = normalize_prompts(model, prompts_or_ids, add_special_tokens)
    adapter_name = _pick_adapter(model, adapter)
    loaded = model.adapters[adapter_name] if adapter_name else LoadedAdapter("")
    cfg = (settings or DecodeSettings()).replace(**decode).validate()
    cfg = cfg.resolved(model.block_size, loaded.meta if mode in SPEC_MODES else None,
                       quadratic=mode == "self_spec_quadratic")
    lora = check_lora_mode(lora_mode or loaded.lora_mode)
    _validate(model, prompts, mode, max_new_tokens, cfg)
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r}; expected one of {COMPILE_MODES}")
    static = compile == "reduce-overhead"
    out = Outputs(len(prompts), max_new_tokens, model.eos_token_ids)
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with compiled_backbone(model, compile), tqdm(total=len(prompts), desc=f"generate[{mode}]", unit="prompt",
                                                 disable=not progress) as bar:
        forward_s = 0.0
        for start in range(0, len(prompts), batch_size or len(prompts)):
            ids = list(range(start, min(start + (batch_size or len(prompts)), len(prompts))))
            tb = time.perf_counter()
            chunk = [prompts[i] for i in ids]
            capacity = max(map(len, chunk)) + max_new_tokens + lookahead(mode, cfg.block_size, cfg.draft_len)
            if static:
                capacity = -(-capacity // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP
            out.begin(ids)
            batch = DecodeBatch(model, chunk, ids, out.stats, capacity=capacity, adapter=adapter_name,
                                lora_mode=lora, profile=profile, static_shapes=static)
            LOOPS[mode](batch, out, cfg, gen)
            forward_s += batch.forward_s
            for i in ids:
                out.stats[i].wall_s = time.perf_counter() - tb
            bar.update(len(ids))
    stats = GenerationStats(out.stats, time.perf_counter() - t0, forward_s if profile else None)
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(seq, skip_special_tokens=False) for seq in out.tokens]
    return GenerationResult(out.tokens, texts, stats, prompts, cfg)


RECOMPILE_LIMIT = 64  # compiled graphs per forward code object a compiled decode allows (api.compiled_backbone)


@contextmanager
def compiled_backbone(model, compile: bool | str) -> Iterator[None]:
    """Within the block the backbone runs through torch.compile (nn.Module.compile; dynamic shapes, or CUDA graphs
    with "reduce-overhead"); afterwards it is eager again (training on the same model object stays uncompiled).
    Compiled code is cached per process."""
    if not compile:
        yield
        return
    # every backbone tree runs the same forward code, so dynamo's per-code recompile limit (8) counts the graphs of
    # all of them (widths 1 and > 1, prefill, per tree): past it the rest ran eager
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    previous = {id(e): e._compiled_call_impl for e in decode_encoders(model)}
    for e in decode_encoders(model):
        compile_module(e, compile)
    state = decode_state(model)
    state.compile_mode = compile  # twins built during the call are compiled as they are built
    try:
        yield
    finally:
        state.compile_mode = False
        torch._dynamo.config.recompile_limit = limit  # compiled code stays cached; later calls raise it again
        for e in decode_encoders(model):
            e._compiled_call_impl = previous.get(id(e))
