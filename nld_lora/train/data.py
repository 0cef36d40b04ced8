"""Training sequences from collected targets: split, truncation, and seeded draft-start sampling."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from nld_lora.data.collect import BRANCH_SEP
from nld_lora.train.objective import DraftBatch


@dataclass
class Sequence:
    ids: list[int]
    prompt_len: int
    prompt_id: str
    group: str = ""  # held-out evaluation keeps a group together ("" = the prompt alone)
    branch: int = 0  # 0: the prompt's own greedy answer; n: its n-th sampled-start branch (training only)


def build_sequences(rows, max_seq_len: int, min_target: int = 2, max_target: int | None = None) -> list[Sequence]:
    """prompt_ids + target_ids (the first max_target of them), keeping the last max_seq_len tokens (prompt cut on
    the left)."""
    groups = rows["group"] if "group" in rows.column_names else [""] * len(rows)
    branches = rows["branch"] if "branch" in rows.column_names else [0] * len(rows)
    out = []
    for pid, group, branch, prompt, target in zip(rows["prompt_id"], groups, branches, rows["prompt_ids"],
                                                  rows["target_ids"]):
        if len(target) < min_target:
            continue
        ids = list(prompt) + list(target[:max_target])
        cut = max(0, len(ids) - max_seq_len)
        out.append(Sequence(ids[cut:], max(len(prompt) - cut, 1), pid, group or "", branch))
    return out


def split_eval(seqs: list[Sequence], fraction: float, seed: int,
               by: str = "group") -> tuple[list[Sequence], list[Sequence]]:
    """Stable split by a hash of each sequence's group (by="group": whole source files stay on one side, so the
    eval figure measures transfer) or of its prompt id (by="prompt"); resumed and multi-process runs agree."""
    def is_eval(key: str) -> bool:
        return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction

    def parent(s: Sequence) -> str:  # a branch goes where its prompt goes
        return s.prompt_id.rpartition(BRANCH_SEP)[0] if s.branch else s.prompt_id

    held_out = [is_eval((s.group or parent(s)) if by == "group" else parent(s)) for s in seqs]
    train = [s for s, h in zip(seqs, held_out) if not h]
    held = [s for s, h in zip(seqs, held_out) if h]
    if not held:
        held = train[-max(1, len(train) // 20):]
        train = train[: len(train) - len(held)]
    return train, held


def make_batch(seqs: list[Sequence], blocks: int, draft_len: int, generator: torch.Generator,
               pad_id: int, device: torch.device | str = "cpu", layout: str = "linear") -> DraftBatch:
    """Right-padded ids and `blocks` draft starts per sequence, uniform over the target part."""
    length = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    starts = torch.full((len(seqs), blocks), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        lo, hi = s.prompt_len, len(s.ids) - 2
        if hi >= lo:
            starts[i] = torch.randint(lo, hi + 1, (blocks,), generator=generator)
    lengths = torch.tensor([len(s.ids) for s in seqs])
    first = torch.tensor([s.prompt_len for s in seqs])
    return DraftBatch(ids.to(device), lengths.to(device), starts.to(device), draft_len, layout, first.to(device))
