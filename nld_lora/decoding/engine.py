"""The step-wise decode engine: requests join and leave a running batch between cycles.

`add_request` validates and queues a request; `step()` admits queued requests (their prefill batched per group),
runs one cycle of every group and returns what each request emitted; `abort` removes a request and frees its row.
Requests whose settings can share a forward (same mode, resolved DecodeSettings, adapter and LoRA mode) form one
group over one ragged batch; different groups take turns, one cycle each per step (docs/design.md). generate() and
the server both drive this engine.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from nld_lora.adapter.attach import LoadedAdapter, check_lora_mode
from nld_lora.decoding.batch import DecodeBatch
from nld_lora.decoding.loops import LOOPS, ModeLoop
from nld_lora.decoding.outputs import Outputs
from nld_lora.decoding.settings import DecodeSettings
from nld_lora.decoding.stats import RequestStats

MODES = tuple(LOOPS)
SPEC_MODES = ("self_spec", "self_spec_quadratic")
STATIC_CAPACITY_STEP = 256  # with static shapes the cache capacity is rounded up to this, so batches share graphs


def lookahead(mode: str, block: int, draft_len: int) -> int:
    """Slots a mode may write past the last kept token (the block or draft it runs ahead)."""
    return {"ar": 1, "diffusion": block, "self_spec": draft_len + 1,
            "self_spec_quadratic": (draft_len + 1) * (draft_len + 2)}[mode]


def pick_adapter(model, adapter: str | bool | None) -> str | None:
    """None: the active adapter (if any); False: none; a name: that loaded adapter."""
    if adapter is False:
        return None
    if adapter is None or adapter is True:
        return model.active_adapter
    if adapter not in model.adapters:
        raise ValueError(f"adapter {adapter!r} is not loaded; loaded: {sorted(model.adapters)}")
    return adapter


def resolve_settings(model, mode: str, settings: DecodeSettings | None, adapter: str | None,
                     decode: dict[str, Any]) -> DecodeSettings:
    """settings with `decode` overrides, validated and resolved for this mode and adapter (block and draft length)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    loaded = model.adapters[adapter] if adapter else LoadedAdapter("")
    cfg = (settings or DecodeSettings()).replace(**decode).validate()
    return cfg.resolved(model.block_size, loaded.meta if mode in SPEC_MODES else None,
                        quadratic=mode == "self_spec_quadratic")


def validate_request(model, prompt: list[int], mode: str, max_new_tokens: int, cfg: DecodeSettings,
                     index: int = 0) -> None:
    """A clear error for a request the model cannot decode (index: its position in the caller's prompts)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0; got {max_new_tokens}")
    limit = model.max_positions
    if not 1 <= cfg.draft_len < limit:
        raise ValueError(f"draft_len must be in [1, {limit}) (the model's max positions); got {cfg.draft_len}")
    ahead = lookahead(mode, cfg.block_size, cfg.draft_len)
    vocab = model.config.vocab_size
    if not prompt:
        raise ValueError(f"prompt {index} is empty")
    if any(not 0 <= t < vocab for t in prompt):
        raise ValueError(f"prompt {index} has token ids outside [0, {vocab})")
    if len(prompt) + max_new_tokens + ahead > limit:
        raise ValueError(f"prompt {index}: {len(prompt)} tokens + max_new_tokens {max_new_tokens} + lookahead {ahead} "
                         f"exceeds the model's {limit} positions")


@dataclass
class Request:
    rid: int
    prompt: list[int]
    mode: str
    settings: DecodeSettings  # resolved
    adapter: str | None
    lora_mode: str
    max_new_tokens: int

    @property
    def group_key(self) -> tuple:
        """Requests with equal keys share a batch and its forwards."""
        return self.mode, dataclasses.astuple(self.settings), self.adapter, self.lora_mode


@dataclass
class StepOutput:
    """What one request emitted in one step; finish_reason is set once it is done ("eos", "length", "abort")."""

    rid: int
    new_tokens: list[int]
    finish_reason: str | None = None


@dataclass
class FinishedRequest:
    request: Request
    tokens: list[int]
    stats: RequestStats


class Engine:
    """The decode engine over one model (not thread-safe: one thread calls it)."""

    def __init__(self, model, *, max_rows: int | None = None, profile: bool = False, static_shapes: bool = False):
        """max_rows: rows decoding at once over all groups (None: no limit); the rest wait in arrival order.
        profile: time every forward (forward_s). static_shapes: CUDA-graph cache layout (see RaggedCache)."""
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1; got {max_rows}")
        self.model = model
        self.max_rows = max_rows
        self.profile = profile
        self.static_shapes = static_shapes
        self.out = Outputs(0, 0, set())
        self.requests: dict[int, Request] = {}
        self.waiting: deque[int] = deque()
        self.groups: dict[tuple, ModeLoop] = {}  # group key -> the loop over that group's batch
        self.finished: dict[int, FinishedRequest] = {}
        self.forward_s = 0.0
        self._generators: dict[tuple, torch.Generator] = {}  # per group key, seeded once and kept: a later group of
        # the same key (generate()'s next chunk) draws on where the last one stopped
        self._reported: dict[int, int] = {}  # rid -> tokens already returned by step()
        self._admitted: dict[int, float] = {}
        self._next_id = 0

    def new_requests(self, prompts: list[list[int]], *, mode: str = "ar", max_new_tokens: int = 128,
                     settings: DecodeSettings | None = None, adapter: str | bool | None = None,
                     lora_mode: str | None = None, **decode: Any) -> list[Request]:
        """Requests of token ids sharing settings (as generate()'s), resolved once and validated, not yet queued:
        a caller queues them with `enqueue` when it wants. Raises ValueError for one the model cannot decode."""
        name = pick_adapter(self.model, adapter)
        cfg = resolve_settings(self.model, mode, settings, name, decode)
        for i, prompt in enumerate(prompts):
            validate_request(self.model, prompt, mode, max_new_tokens, cfg, i)
        lora = check_lora_mode(lora_mode or (self.model.adapters[name].lora_mode if name else "draft_only"))
        first, self._next_id = self._next_id, self._next_id + len(prompts)
        return [Request(first + i, list(p), mode, cfg, name, lora, max_new_tokens) for i, p in enumerate(prompts)]

    def enqueue(self, request: Request, stop_ids: set[int] | None = None) -> int:
        """Queue a request from new_requests; stop_ids: tokens that end it (default: the model's EOS ids)."""
        self.requests[request.rid] = request
        self.out.add(request.rid, request.max_new_tokens,
                     self.model.eos_token_ids if stop_ids is None else set(stop_ids))
        self.waiting.append(request.rid)
        return request.rid

    def add_request(self, prompt: list[int], *, stop_ids: set[int] | None = None, **options: Any) -> int:
        """Validate and queue one request of token ids (options: new_requests'); returns its id."""
        return self.enqueue(self.new_requests([prompt], **options)[0], stop_ids)

    @property
    def running(self) -> int:
        return sum(len(loop.batch) for loop in self.groups.values())

    def has_work(self) -> bool:
        return bool(self.waiting or self.groups)

    def step(self) -> list[StepOutput]:
        """Admit what fits, run one cycle of every group, and return each active request's new tokens."""
        self._admit()
        for loop in list(self.groups.values()):
            if len(loop.batch):
                loop.step()
        return self._collect()

    def abort(self, rid: int) -> bool:
        """Stop a queued or running request now (between steps) and free its row; False if it is not active."""
        if rid in self.waiting:
            self.waiting.remove(rid)
        else:
            key = next((k for k, loop in self.groups.items() if rid in loop.batch.rows), None)
            if key is None:
                return False
            loop = self.groups[key]
            loop.drop([i for i, r in enumerate(loop.batch.rows) if r != rid])
            self._close_empty(key)
        self.out.finish(rid, "abort")
        self._finish(rid)
        return True

    def pop_finished(self, rid: int) -> FinishedRequest:
        return self.finished.pop(rid)

    def _admit(self) -> None:
        free = None if self.max_rows is None else self.max_rows - self.running
        joining: dict[tuple, list[Request]] = {}
        while self.waiting and (free is None or free > 0):
            request = self.requests[self.waiting.popleft()]
            joining.setdefault(request.group_key, []).append(request)
            free = None if free is None else free - 1
        for key, requests in joining.items():
            self._start(key, requests)

    def _start(self, key: tuple, requests: list[Request]) -> None:
        """Prefill requests of one group together and join them to its running batch (or start it)."""
        first = requests[0]
        cfg = first.settings
        capacity = max(len(r.prompt) + r.max_new_tokens for r in requests) + lookahead(first.mode, cfg.block_size,
                                                                                      cfg.draft_len)
        if self.static_shapes:
            capacity = -(-capacity // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP
        rids = [r.rid for r in requests]
        self.out.begin(rids)
        now = time.perf_counter()
        for rid in rids:
            self._admitted[rid] = now
        batch = DecodeBatch(self.model, [r.prompt for r in requests], rids, self.out.stats, capacity=capacity,
                            adapter=first.adapter, lora_mode=first.lora_mode, profile=self.profile,
                            static_shapes=self.static_shapes)
        if key in self.groups:
            self.groups[key].admit(batch)
        else:
            if key not in self._generators:
                self._generators[key] = torch.Generator(device=self.model.device).manual_seed(cfg.seed)
            self.groups[key] = LOOPS[first.mode](batch, self.out, cfg, self._generators[key])
        self._close_empty(key)

    def _close_empty(self, key: tuple) -> None:
        """Drop the group once its batch is empty, keeping what its loop learnt and its forward time."""
        loop = self.groups[key]
        if not len(loop.batch):
            loop.close()
            self.forward_s += loop.batch.forward_s
            del self.groups[key]

    def _collect(self) -> list[StepOutput]:
        outputs = []
        for key in list(self.groups):
            self._close_empty(key)
        for rid in list(self._admitted):
            tokens = self.out.tokens[rid]
            start = self._reported.get(rid, 0)
            reason = self.out.stats[rid].finish_reason or None
            if len(tokens) > start or reason:
                outputs.append(StepOutput(rid, tokens[start:], reason))
            self._reported[rid] = len(tokens)
            if reason:
                self._finish(rid)
        return outputs

    def _finish(self, rid: int) -> None:
        tokens, stats = self.out.remove(rid)
        admitted = self._admitted.pop(rid, None)
        if admitted is not None:
            stats.wall_s = time.perf_counter() - admitted
        self._reported.pop(rid, None)
        self.finished[rid] = FinishedRequest(self.requests.pop(rid), tokens, stats)
