"""A batch of active requests over one preallocated RaggedCache.

Each request owns a row and a length (its committed tokens, prompt included). A forward writes its q tokens at
slots length .. length + q - 1 of the row; `advance` keeps the first `keep` of them, and whatever lies past the new
length is overwritten by the next forward, so rejected drafts and draft-only forwards cost no cache copy. The kind
of a forward (FORWARD_KINDS) decides its block layout (mask pattern, positions), the adapter state and the count.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nld_lora.adapter.twins import build_twins, lora_token_gate, pathway_encoder
from nld_lora.decoding.lookup import NgramIndex
from nld_lora.decoding.ragged_cache import RaggedCache
from nld_lora.decoding.sampling import select_tokens
from nld_lora.decoding.stats import RequestStats
from nld_lora.model.masks import block_pattern, quadratic_offsets, quadratic_pattern, ragged_mask

FORWARD_KINDS = {  # kind -> block layout (see BlockLayout); each kind is also its own stats counter
    "prefill": "causal",
    "ar": "causal",
    "verify": "causal",
    "commit": "causal",
    "draft": "bidirectional",
    "denoise": "bidirectional",
    "verify_draft": "quadratic",
}


@dataclass(frozen=True)
class BlockLayout:
    """How a forward's q new tokens are laid out: who sees whom, at which positions, which ones draft."""

    pattern: torch.Tensor  # (q, q) bool: new token i sees new token j
    offsets: torch.Tensor  # (q,) position of each new token past the row's length
    draft_start: int  # tokens from this index on are on the drafting pathway (a draft_only adapter is on for them)

    @property
    def all_drafting(self) -> bool:
        return self.draft_start == 0

    @property
    def any_drafting(self) -> bool:
        return self.draft_start < len(self.offsets)


def make_layout(kind: str, q: int, masks_per_row: int, device: torch.device) -> BlockLayout:
    if kind == "quadratic":
        rows = q // (1 + masks_per_row)  # the verify rows come first, their masks after them
        return BlockLayout(quadratic_pattern(rows, masks_per_row, device),
                           quadratic_offsets(rows, masks_per_row, device), rows)
    return BlockLayout(block_pattern(kind, q, device), torch.arange(q, device=device),
                       0 if kind == "bidirectional" else q)


def merge_drafts(lookups: list[list[int]], drafts: torch.Tensor | None, k: int, filler: int,
                  device) -> torch.Tensor:
    """Rows with a lookup take it (its tail past the match from the diffusion draft, or a filler token that
    verification rejects); the others keep their diffusion draft."""
    merged = drafts.clone() if drafts is not None else torch.full((len(lookups), k), filler, dtype=torch.long,
                                                                   device=device)
    for i, found in enumerate(lookups):
        if found:
            merged[i, :len(found)] = torch.tensor(found, dtype=torch.long, device=device)
    return merged


class DecodeBatch:
    def __init__(self, model, prompts: list[list[int]], request_ids: list[int], stats: list[RequestStats],
                 *, capacity: int, adapter: str | None = None, lora_mode: str = "draft_only", profile: bool = False,
                 static_shapes: bool = False):
        """capacity: KV slots per row, at least the longest prompt + new tokens + the widest forward.
        static_shapes: attention always spans the whole capacity (CUDA graphs; see RaggedCache)."""
        self.model = model
        self.rows = list(request_ids)
        self.prompts = dict(zip(request_ids, prompts))  # request id -> prompt ids (prompt-lookup drafts read them)
        self.ngram_index: dict[int, NgramIndex] = {}  # request id -> its prompt-lookup index (built on first use)
        self.stats = stats
        self.adapter = adapter
        self.lora_mode = lora_mode
        self.lengths = [0] * len(prompts)  # committed slots per row (host copy: no device sync to read it)
        self.initial_rows = len(prompts)  # rows when decoding began (or last grew by a merge): draft_len="auto"
        # measures forward costs for this many, and prices the fewer left once some finish from what it measured
        # (auto.forward_seconds)
        self.cache = RaggedCache(model.config.num_hidden_layers, capacity, static=static_shapes)
        self.profile = profile  # time every forward (synchronising the device) into forward_s
        self.forward_s = 0.0
        self._layouts: dict[tuple[str, int, int], BlockLayout] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def layout(self, kind: str, q: int, masks_per_row: int = 0) -> BlockLayout:
        """The block layout of a forward kind at width q, built once per shape."""
        key = (FORWARD_KINDS[kind], q, masks_per_row)
        if key not in self._layouts:
            self._layouts[key] = make_layout(key[0], q, masks_per_row, self.model.device)
        return self._layouts[key]

    def adapter_follows_pathway(self) -> bool:
        """Whether the adapter is on for drafting tokens only (draft_only), so a forward that mixes pathways needs a
        per-token gate."""
        return self.adapter is not None and self.lora_mode != "both"

    def gated(self, layout: BlockLayout) -> bool:
        """Whether a forward of this layout runs the adapter on some of its tokens only (a per-token gate)."""
        return self.adapter_follows_pathway() and layout.any_drafting and not layout.all_drafting

    def build_twins(self, quadratic: bool) -> None:
        """Build the twins this batch's forwards will run before any of them is timed (twins.build_twins): a
        single-forward layout always mixes verify and draft tokens, so it takes the gated twin too."""
        build_twins(self.model, self.adapter, gated=quadratic and self.adapter_follows_pathway())

    def _pathway(self, layout: BlockLayout):
        """Context manager yielding the backbone to run for this layout (None: the model's own, PEFT switched as
        needed): a twin without PEFT wrappers where the adapter is wholly on or off, a gated twin (or PEFT with a
        per-token gate) where only some tokens draft."""
        if self.gated(layout):
            return lora_token_gate(self.model, self.adapter, layout.draft_start)
        on = self.lora_mode == "both" or layout.all_drafting
        encoder = pathway_encoder(self.model, self.adapter, on)
        return nullcontext(encoder) if encoder is not None else self.model.adapter_enabled(self.adapter, on)

    def _clock(self) -> float:
        if not self.profile:
            return 0.0
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def prefill(self) -> torch.Tensor:
        """Causal forward over the left-aligned prompts (writes slots 0..len-1); logits of each row's last token."""
        device = self.model.device
        sizes = [len(self.prompts[rid]) for rid in self.rows]
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        ids = torch.full((len(self), max(sizes)), pad, dtype=torch.long, device=device)
        for i, rid in enumerate(self.rows):
            ids[i, :sizes[i]] = torch.tensor(self.prompts[rid], device=device)
        last = torch.tensor(sizes, device=device)[:, None] - 1
        logits = self.forward(ids, "prefill", logits_index=last, eager=True)
        self.lengths = sizes
        return logits

    def forward(self, tokens: torch.Tensor, kind: str, *, logits_index: slice | torch.Tensor | None = None,
                counted: list[bool] | None = None, masks_per_row: int = 0, eager: bool = False) -> torch.Tensor:
        """Run tokens (B, Q) as a `kind` forward written at each row's length (see FORWARD_KINDS); the cache keeps
        them only once `advance` says so.

        logits_index: the query positions that need logits (the vocabulary projection skips the others).
        counted: which rows count this forward in their stats (default: all).
        masks_per_row: masks per sub-block of a "verify_draft" forward.
        eager: bypass a torch.compile'd backbone (the prefill: one shape per prompt length, run once).
        """
        device = tokens.device
        q = tokens.shape[1]
        layout = self.layout(kind, q, masks_per_row)
        lengths = torch.tensor(self.lengths, device=device)
        self.cache.begin(self.lengths, q, device)
        mask = ragged_mask(lengths, self.cache.window, layout.pattern)
        positions = lengths[:, None] + layout.offsets
        t0 = self._clock()
        with self._pathway(layout) as encoder:
            logits, _ = self.model(tokens, attention_mask=mask, position_ids=positions, cache=self.cache,
                                   logits_index=logits_index, encoder=encoder, eager=eager)
        if self.profile:
            self.forward_s += self._clock() - t0
        for i, rid in enumerate(self.rows):
            if counted is None or counted[i]:
                self.stats[rid].forwards[kind] += 1
        return logits

    def draft(self, seeds: torch.Tensor, k: int, leads: list[list[int]] | None = None, *, temperature: float = 0.0,
              generator: torch.Generator | None = None, top_k: int | None = None,
              top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft forward over [seed, mask x k] per row: (drafts (B, k), their logits). A row's lead (a lookup
        draft) fills its first masks, which the diffusion drafts after it see, and stands in its drafts as given."""
        mask_id = self.model.mask_token_id
        block = torch.full((len(seeds), k + 1), mask_id, dtype=torch.long, device=seeds.device)
        block[:, 0] = seeds
        if leads is not None:
            block[:, 1:] = merge_drafts(leads, block[:, 1:], k, mask_id, seeds.device)
        logits = self.forward(block, "draft", logits_index=slice(1, None))
        drafts = select_tokens(logits, temperature, generator, top_k, top_p)
        if leads is not None:  # one op, no second copy of the leads
            drafts = torch.where(block[:, 1:] != mask_id, block[:, 1:], drafts)
        return drafts, logits

    def rewind(self, lengths: list[int]) -> None:
        """Decode from shorter contexts whose cache is a prefix of what each row holds (no forward needed)."""
        if any(n > held for n, held in zip(lengths, self.lengths)) or len(lengths) != len(self.lengths):
            raise ValueError(f"rewind to {lengths}: each row can only go back from {self.lengths}")
        self.lengths = list(lengths)

    def committed(self) -> list[int]:
        """Tokens in the cache past each row's prompt."""
        return [n - len(self.prompts[rid]) for n, rid in zip(self.lengths, self.rows)]

    def advance(self, keep: list[int]) -> None:
        """After a forward, keep its first keep[b] tokens in row b (the rest will be overwritten)."""
        self.lengths = [n + k for n, k in zip(self.lengths, keep)]

    def select(self, keep_rows: list[int]) -> None:
        """Keep only these batch rows (indices into the current batch)."""
        self.cache.select_rows(torch.tensor(keep_rows, dtype=torch.long, device=self.model.device))
        self.lengths = [self.lengths[i] for i in keep_rows]
        left = set(self.rows) - {self.rows[i] for i in keep_rows}
        self.rows = [self.rows[i] for i in keep_rows]
        for rid in left:  # a long-running engine must not keep every request it ever served
            self.prompts.pop(rid, None)
            self.ngram_index.pop(rid, None)

    def merge(self, other: DecodeBatch) -> None:
        """Append the rows of another prefilled batch of the same model and settings (requests joining between
        cycles); the cache grows to the larger capacity."""
        self.cache.append_rows(other.cache)
        self.rows += other.rows
        self.lengths += other.lengths
        self.prompts.update(other.prompts)
        self.ngram_index.update(other.ngram_index)
        self.initial_rows = max(self.initial_rows, len(self.rows))
        self.forward_s += other.forward_s
