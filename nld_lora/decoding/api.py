"""generate(): the one decoding entry point used by collection, training-time evaluation and reports."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from nld_lora.adapter.twins import compile_module, decode_encoders, decode_state
from nld_lora.decoding.engine import (
    MODES,
    SPEC_MODES,
    STATIC_CAPACITY_STEP,
    Engine,
    lookahead,
)
from nld_lora.decoding.settings import DecodeSettings, resolve_draft_len
from nld_lora.decoding.stats import GenerationStats

COMPILE_MODES = (False, True, "reduce-overhead")
__all__ = ["MODES", "SPEC_MODES", "STATIC_CAPACITY_STEP", "GenerationResult", "generate", "lookahead",
           "max_prompt_tokens", "normalize_prompts"]


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


def max_prompt_tokens(model, mode: str, max_new_tokens: int, *, block_size: int | None = None,
                      draft_len: int | None = None) -> int:
    """The longest prompt `generate` accepts for this mode and budget (same defaults as generate)."""
    block = block_size or model.block_size
    return model.max_positions - max_new_tokens - lookahead(mode, block, resolve_draft_len(block, draft_len, mode == "self_spec_quadratic"))


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
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r}; expected one of {COMPILE_MODES}")
    engine = Engine(model, profile=profile, static_shapes=compile == "reduce-overhead")
    requests = engine.new_requests(prompts, mode=mode, max_new_tokens=max_new_tokens, settings=settings,
                                   adapter=adapter, lora_mode=lora_mode, **decode)  # all validated before decoding
    chunk = batch_size or len(prompts)
    t0 = time.perf_counter()
    with compiled_backbone(model, compile), tqdm(total=len(prompts), desc=f"generate[{mode}]", unit="prompt",
                                                 disable=not progress) as bar:
        for start in range(0, len(prompts), chunk):
            tb = time.perf_counter()
            rids = [engine.enqueue(r) for r in requests[start:start + chunk]]
            while engine.has_work():
                engine.step()
            for rid in rids:  # a chunk's requests share its wall time, as one batch call's would
                engine.finished[rid].stats.wall_s = time.perf_counter() - tb
            bar.update(len(rids))
    done = [engine.pop_finished(rid) for rid in range(len(prompts))]
    stats = GenerationStats([f.stats for f in done], time.perf_counter() - t0, engine.forward_s if profile else None)
    sequences = [f.tokens for f in done]
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(seq, skip_special_tokens=False) for seq in sequences]
    return GenerationResult(sequences, texts, stats, prompts, requests[0].settings)


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
