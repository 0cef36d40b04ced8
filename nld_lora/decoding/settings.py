"""DecodeSettings: how to decode (sampling, block/draft shape, acceptance rule), defined once for every caller.

generate() takes one (or its fields as keywords); the collection and report configs embed one; the CLI and the
recipe YAML reach its fields as `decode.<field>`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nld_lora.adapter.meta import AdapterMeta

POLICIES = ("confidence", "leftmost")
ACCEPTANCE_RULES = ("rejection", "exact_match")


class AutoDraftLen(int):
    """draft_len="auto" once resolved: the ceiling under which each cycle picks 0..ceiling drafts (decoding/auto.py);
    an int, so every shape computed from draft_len uses the ceiling."""

    def __repr__(self) -> str:
        return f"AutoDraftLen({int(self)})"


QUADRATIC_DRAFT_LEN = 3  # single-forward default: (k+1)(k+2) = 20 tokens per forward, what a CPU affords


def resolve_draft_len(block_size: int, draft_len: int | None, quadratic: bool = False) -> int:
    """Draft tokens per self-speculation cycle: as given, else block_size - 1 (NLD drafts [seed, mask x (B-1)]);
    single-forward mode (whose forward grows as (k+1)(k+2)) defaults to min(QUADRATIC_DRAFT_LEN, block_size - 1)."""
    if draft_len is not None:
        return draft_len
    return max(min(block_size - 1, QUADRATIC_DRAFT_LEN) if quadratic else block_size - 1, 1)


@dataclass
class DecodeSettings:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    block_size: int | None = None  # None: the model's block_size
    threshold: float = 0.9  # diffusion: commit every masked position at least this confident
    policy: str = "confidence"  # diffusion: the forced commit per step (confidence | leftmost)
    max_steps: int | None = None  # diffusion: denoising steps per block (None: block_size - 1)
    draft_len: int | str | None = None  # self-spec: None = the adapter's trained draft_len, else block_size - 1;
    # "auto" = each cycle picks 0..(that default) drafts by measured acceptance and forward costs (0 = an AR step)
    acceptance: str = "rejection"  # self-spec at temperature > 0: rejection sampling | exact_match (NLD's rule)
    ngram: int = 0  # self-spec, greedy: prompt-lookup drafts (longest matching suffix up to ngram tokens) when one
    # matches, the diffusion draft otherwise; a cycle whose every row matched skips the draft forward. 0 = off
    seed: int = 0

    def validate(self) -> DecodeSettings:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}; expected one of {POLICIES}")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"acceptance={self.acceptance!r}; expected one of {ACCEPTANCE_RULES}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {self.block_size}")
        if self.ngram < 0:
            raise ValueError(f"ngram must be >= 0; got {self.ngram}")
        if isinstance(self.draft_len, str) and self.draft_len != "auto":
            raise ValueError(f"draft_len must be an integer or 'auto'; got {self.draft_len!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        return self

    @property
    def auto_draft(self) -> bool:
        """draft_len="auto", given or resolved."""
        return self.draft_len == "auto" or isinstance(self.draft_len, AutoDraftLen)

    def resolved(self, model_block_size: int, adapter: AdapterMeta | None = None,
                 quadratic: bool = False) -> DecodeSettings:
        """A copy with block_size and draft_len filled in: the given draft_len, else the adapter's trained one when it
        was trained for this mode's draft layout, else resolve_draft_len's default (the one rule training uses too)."""
        block = self.block_size or model_block_size
        if self.auto_draft:
            return dataclasses.replace(self, block_size=block,
                                       draft_len=AutoDraftLen(resolve_draft_len(block, None, quadratic)))
        draft = self.draft_len
        if draft is None and adapter is not None and adapter.draft_layout == ("quadratic" if quadratic else "linear"):
            draft = adapter.draft_len
        return dataclasses.replace(self, block_size=block, draft_len=resolve_draft_len(block, draft, quadratic))

    def replace(self, **changes) -> DecodeSettings:
        """A copy with some fields changed; unknown names are an error that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown decode setting(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **changes)
