"""A batch of active requests sharing one transformers DynamicCache.

Each request owns a row. Slots that a request must not see (left padding, rejected drafts) are marked
invalid and squeezed out after every write, so the cache stays as long as the longest live request.
`forward(tokens, kind)` derives the mask, the cache write, the adapter state and the forward count from the kind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from nld_lora.decoding.stats import RequestStats
from nld_lora.model.masks import causal_mask, draft_mask


@dataclass(frozen=True)
class ForwardKind:
    writes_cache: bool  # causal forwards extend the cache; draft/denoise forwards read it only
    bidirectional: bool  # the block attends to all of itself
    drafts: bool  # the drafting pathway: the adapter is on (draft_only) here and only here


FORWARD_KINDS = {
    "prefill": ForwardKind(True, False, False),
    "ar": ForwardKind(True, False, False),
    "verify": ForwardKind(True, False, False),
    "commit": ForwardKind(True, False, False),
    "draft": ForwardKind(False, True, True),
    "denoise": ForwardKind(False, True, True),
}


class DecodeBatch:
    def __init__(self, model, prompts: list[list[int]], request_ids: list[int], stats: list[RequestStats],
                 *, adapter: str | None = None, lora_mode: str = "draft_only", profile: bool = False):
        self.model = model
        self.rows = list(request_ids)
        self.prompts = dict(zip(request_ids, prompts))  # request id -> prompt ids (prompt-lookup drafts read them)
        self.stats = stats
        self.adapter = adapter
        self.lora_mode = lora_mode
        device = model.device
        width = max(len(p) for p in prompts)
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.prompt_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        self.valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            self.prompt_ids[i, width - len(p):] = torch.tensor(p, device=device)
            self.valid[i, width - len(p):] = True
        self.cache = DynamicCache(config=model.config)
        self.next_pos = self.valid.sum(1)
        self.profile = profile  # time every forward (synchronising the device) into forward_s
        self.forward_s = 0.0

    def __len__(self) -> int:
        return len(self.rows)

    def _run(self, kind: str, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             logits_index, counted: list[bool] | None) -> torch.Tensor:
        spec = FORWARD_KINDS[kind]
        on = spec.drafts or self.lora_mode == "both"
        t0 = self._clock()
        with self.model.adapter_enabled(self.adapter, on):
            logits, _ = self.model(tokens, attention_mask=mask, position_ids=positions, cache=self.cache,
                                   logits_index=logits_index)
        if self.profile:
            self.forward_s += self._clock() - t0
        for i, rid in enumerate(self.rows):
            if counted is None or counted[i]:
                self.stats[rid].forwards[kind] += 1
        return logits

    def _clock(self) -> float:
        if not self.profile:
            return 0.0
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def prefill(self) -> torch.Tensor:
        """Causal forward over the left-padded prompts (writes the cache); logits of each row's last token."""
        width = self.prompt_ids.shape[1]
        positions = (self.valid.long().cumsum(1) - 1).clamp(min=0)
        return self._run("prefill", self.prompt_ids, causal_mask(self.valid, width), positions,
                         slice(width - 1, width), None)

    def forward(self, tokens: torch.Tensor, kind: str, *, logits_index: slice | None = None,
                counted: list[bool] | None = None) -> torch.Tensor:
        """Run tokens (B, Q) after each row's valid prefix as a `kind` forward (see FORWARD_KINDS).

        logits_index: the query positions that need logits (the vocabulary projection skips the others).
        counted: which rows count this forward in their stats (default: all).
        """
        spec = FORWARD_KINDS[kind]
        q = tokens.shape[1]
        key_valid = torch.cat([self.valid, torch.ones(len(self), q, dtype=torch.bool, device=self.valid.device)], 1)
        mask = draft_mask(key_valid, q) if spec.bidirectional else causal_mask(key_valid, q)
        positions = self.next_pos[:, None] + torch.arange(q, device=tokens.device)
        logits = self._run(kind, tokens, mask, positions, logits_index, counted)
        if spec.writes_cache:
            self.valid = key_valid
        else:
            self.cache.crop(-q)
        return logits

    def keep_written(self, q: int, keep: torch.Tensor) -> None:
        """After a write of q tokens, keep the first keep[b] of them for row b; drop the rest from the cache."""
        offsets = torch.arange(q, device=keep.device)
        self.valid[:, -q:] &= offsets[None, :] < keep[:, None]
        self.next_pos = self.next_pos + keep
        self._compact()

    def select(self, keep_rows: list[int]) -> None:
        """Keep only these batch rows (indices into the current batch)."""
        index = torch.tensor(keep_rows, dtype=torch.long, device=self.valid.device)
        self.cache.batch_select_indices(index)
        self.valid = self.valid[index]
        self.next_pos = self.next_pos[index]
        self.rows = [self.rows[i] for i in keep_rows]
        self._compact()

    def _compact(self) -> None:
        """Gather each row's valid slots to the right end; length becomes the longest row's count."""
        if len(self) == 0 or bool(self.valid.all()):
            return
        counts = self.valid.sum(1)
        new_len = int(counts.max())
        order = torch.argsort(self.valid.to(torch.int8), dim=1, stable=True)[:, -new_len:]
        new_valid = torch.gather(self.valid, 1, order)
        for layer in self.cache.layers:
            idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = torch.gather(layer.keys, 2, idx)
            layer.values = torch.gather(layer.values, 2, idx)
        self.valid = new_valid
