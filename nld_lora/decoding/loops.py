"""One decode cycle per mode over a DecodeBatch (AR, block diffusion, linear and single-forward self-speculation).

Each mode is a ModeLoop: built over a prefilled batch, `step()` runs one cycle for every row, `admit(batch)` joins
newly prefilled rows between cycles, `drop(rows)` removes rows (aborted requests). The engine (decoding/engine.py)
steps them; run_to_end decodes a batch to its end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nld_lora.adapter.twins import planner_memory
from nld_lora.decoding.auto import DraftPlanner, rows_bucket
from nld_lora.decoding.batch import DecodeBatch, merge_drafts
from nld_lora.decoding.lookup import NgramIndex
from nld_lora.decoding.outputs import Outputs
from nld_lora.decoding.sampling import filter_logits, select_tokens, select_with_confidence
from nld_lora.decoding.settings import DecodeSettings
from nld_lora.kernels import verify_greedy, verify_sampled
from nld_lora.kernels.rng import mix32


def _commit_rows(batch: DecodeBatch, out: Outputs, new_tokens: list[list[int]], seeds: torch.Tensor,
                 *carried: torch.Tensor):
    """Commit per-row tokens, drop finished rows; returns the seeds (and any carried per-row tensors) of the rows
    still live."""
    live = [i for i, rid in enumerate(batch.rows) if not out.commit(rid, new_tokens[i])]
    if len(live) != len(batch):
        batch.select(live)
        seeds, carried = seeds[live], tuple(t[live] for t in carried)
    return (seeds, *carried) if carried else seeds


def _prefill(batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator) -> torch.Tensor:
    seeds = select_tokens(batch.prefill()[:, -1], cfg.temperature, gen, cfg.top_k, cfg.top_p)
    return _commit_rows(batch, out, [[t] for t in seeds.tolist()], seeds)


def _pick_positions(conf: torch.Tensor, masked: torch.Tensor, cfg: DecodeSettings, last_step: bool) -> torch.Tensor:
    """Which masked positions to commit this step: the forced one (policy) plus all above the threshold."""
    if last_step:
        return masked.clone()
    choose = masked & (conf >= cfg.threshold)
    has_mask = masked.any(1)
    if cfg.policy == "leftmost":
        forced = masked.to(torch.int8).argmax(1)
    else:
        forced = conf.masked_fill(~masked, float("-inf")).argmax(1)
    rows = torch.arange(len(masked), device=masked.device)
    choose[rows[has_mask], forced[has_mask]] = True
    return choose


def _to_host(n_acc: torch.Tensor, drafts: torch.Tensor, tokens: torch.Tensor):
    """One device->host copy per cycle: accepted counts, drafts and emitted tokens as lists."""
    k = drafts.shape[1]
    host = torch.cat([n_acc[:, None], drafts, tokens.long()], 1).tolist()
    return [r[0] for r in host], [r[1:k + 1] for r in host], [r[k + 1:] for r in host]


def _cycle_seeds(cfg: DecodeSettings, rows: list[int], cycle: int, device) -> torch.Tensor:
    base = torch.tensor([cfg.seed * 7919 + cycle] * len(rows), dtype=torch.int64, device=device)
    return mix32((base ^ torch.tensor(rows, dtype=torch.int64, device=device) * 0x27D4EB2F) & 0xFFFFFFFF)


def _exact_match(target: torch.Tensor, drafts: torch.Tensor, cfg: DecodeSettings, gen: torch.Generator):
    """NLD's rule: sample the AR token at every row and accept drafts equal to it (lossless, accepts less)."""
    ar = select_tokens(target, cfg.temperature, gen, cfg.top_k, cfg.top_p)
    k = drafts.shape[1]
    n = (ar[:, :k] == drafts).to(torch.int32).cumprod(1).sum(1)
    tokens = torch.full_like(ar, -1, dtype=torch.int32)
    tokens[:, :k] = torch.where(torch.arange(k, device=ar.device) < n[:, None], drafts, -1)
    rows = torch.arange(len(ar), device=ar.device)
    tokens[rows, n] = ar[rows, n].to(torch.int32)
    return tokens, n


class Lookups(NamedTuple):
    """Per row, its prompt-lookup draft ([] when none) and the n-gram length the draft matched (0 when none); both
    None when lookup is off."""

    drafts: list[list[int]] | None
    orders: list[int] | None


NO_LOOKUPS = Lookups(None, None)


def _lookup_drafts(batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, k: int) -> Lookups:
    """Per row, a prompt-lookup draft from prompt + committed tokens (greedy only: verification then stays exact
    without draft probabilities); NO_LOOKUPS when lookup is off."""
    if cfg.ngram <= 0 or cfg.temperature > 0:
        return NO_LOOKUPS
    drafts, orders = [], []
    for rid in batch.rows:
        index = batch.ngram_index.get(rid)
        if index is None:
            index = batch.ngram_index[rid] = NgramIndex(batch.prompts[rid], cfg.ngram)
        index.extend(out.tokens[rid][len(index.tokens) - len(batch.prompts[rid]):])
        order, draft = index.match(k)
        drafts.append(draft)
        orders.append(order)
    return Lookups(drafts, orders)


def _verify(target: torch.Tensor, drafts: torch.Tensor, draft_logits: torch.Tensor | None, cfg: DecodeSettings,
            gen: torch.Generator, batch: DecodeBatch, cycle: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits (B, k+1, V) against drafts (B, k): emitted tokens (B, k+1; -1 past the bonus) and the number
    of accepted drafts per row. Greedy: longest agreeing prefix + AR's token; sampled: rejection sampling (or NLD's
    exact-match rule), lossless either way."""
    n_rows, k = drafts.shape
    cu = [i * k for i in range(n_rows + 1)]  # host offsets: nothing is read back to check them
    if cfg.temperature <= 0:
        tokens, n_acc = verify_greedy(target.reshape(-1, target.shape[-1]), drafts.reshape(-1), cu)
    elif cfg.acceptance == "exact_match":
        tokens, n_acc = _exact_match(target, drafts, cfg, gen)
    else:
        temps = torch.full((n_rows,), cfg.temperature, device=drafts.device)
        tokens, n_acc = verify_sampled(
            filter_logits(target, cfg.top_k, cfg.top_p).reshape(-1, target.shape[-1]),
            filter_logits(draft_logits, cfg.top_k, cfg.top_p).reshape(-1, target.shape[-1]),
            drafts.reshape(-1), cu, temps, _cycle_seeds(cfg, batch.rows, cycle, drafts.device),
        )
    return tokens, n_acc.long()


def _record(batch: DecodeBatch, out: Outputs, starts: list[int], accepted: list[int], drafted: list[list[int]],
            emitted: list[list[int]], lookups: list[list[int]] | None) -> list[list[int]]:
    """Per-row cycle statistics; returns each row's new tokens (accepted drafts + the bonus token)."""
    new = []
    for i, rid in enumerate(batch.rows):
        out.stats[rid].record_cycle(starts[i], accepted[i], drafted[i])
        out.stats[rid].lookup_cycles += bool(lookups and lookups[i])
        new.append(emitted[i][: accepted[i] + 1])
    return new


def _planner(batch: DecodeBatch, cfg: DecodeSettings, quadratic: bool) -> DraftPlanner | None:
    """The adaptive draft-length planner, or None. It starts from what the last planner of this adapter, layout and
    batch-size bucket learnt in this process, else from the adapter's evaluated per-position rates (when it was trained for this
    mode's draft layout)."""
    if not cfg.auto_draft:
        return None
    loaded = batch.model.adapters.get(batch.adapter) if batch.adapter else None
    layout = "quadratic" if quadratic else "linear"
    prior = loaded.meta.per_position if loaded is not None and loaded.meta.draft_layout == layout else None
    key = _memory_key(batch, layout, lookups=cfg.ngram > 0 and cfg.temperature <= 0)
    batch.build_twins(quadratic)  # before any cycle is timed
    return DraftPlanner(cfg.draft_len, quadratic, prior, planner_memory(batch.model).get(key), memory_key=key)


def _memory_key(batch: DecodeBatch, layout: str, lookups: bool) -> tuple:
    """(adapter, layout, rows bucket, prompt lookup on): cost ratios differ with the batch size, and a cycle's
    observed time with the lookup work in it, so each learns apart."""
    return batch.adapter, layout, rows_bucket(len(batch)), lookups


def _remember(batch: DecodeBatch, planner: DraftPlanner | None) -> None:
    if planner is not None:
        planner_memory(batch.model)[planner.memory_key] = planner.remember()


def _ar_step(batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator,
             seeds: torch.Tensor) -> torch.Tensor:
    logits = batch.forward(seeds[:, None], "ar")
    batch.advance([1] * len(batch))
    seeds = select_tokens(logits[:, -1], cfg.temperature, gen, cfg.top_k, cfg.top_p)
    return _commit_rows(batch, out, [[t] for t in seeds.tolist()], seeds)


def _ar_run(batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator, seeds: torch.Tensor,
            planner: DraftPlanner, lookups: bool) -> tuple[torch.Tensor, Lookups | None]:
    """The AR step the planner chose, or its run of them (DraftPlanner.ar_run), each noted as a choice of 0 drafts;
    the run ends early when a row finishes or, with lookups, every row finds a lookup draft (a choice to weigh).
    Returns the seeds and, when the run ended on found lookups, those drafts (the next cycle's, not looked up
    again), else None."""
    rows, steps, found = len(batch), 0, None
    for _ in range(planner.ar_run()):
        if steps:
            if len(batch) != rows:
                break
            if lookups and _all_found(looked := _lookup_drafts(batch, out, cfg, cfg.draft_len)):
                found = looked
                break
            _note_choice(batch, out, 0)
        seeds = _ar_step(batch, out, cfg, gen, seeds)
        steps += 1
    planner.finish(0, steps=steps)
    return seeds, found


def _all_found(lookups: Lookups) -> bool:
    return lookups.drafts is not None and all(lookups.drafts)


def _note_choice(batch: DecodeBatch, out: Outputs, k: int) -> None:
    for rid in batch.rows:
        out.stats[rid].draft_len_choices.append(k)




class ModeLoop:
    """One mode's cycle over a batch whose rows may join (admit) and leave (finished, or drop) between cycles.
    Per-row state past the seeds (the next cycle's drafts) lives in the tensors `carried` names."""

    carried: tuple[str, ...] = ()

    def __init__(self, batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator):
        self.batch, self.out, self.cfg, self.gen = batch, out, cfg, gen
        self.cycle = 0
        self.seeds = _prefill(batch, out, cfg, gen)

    def step(self) -> None:
        raise NotImplementedError

    def admit(self, new: DecodeBatch) -> None:
        """Prefill `new` (rows of the same settings) and join its unfinished rows to the running batch."""
        seeds = _prefill(new, self.out, self.cfg, self.gen)
        if not len(new):
            return
        self.batch.merge(new)
        self.seeds = torch.cat([self.seeds, seeds])
        self._join_carried(len(new))

    def _join_carried(self, n_new: int) -> None:
        """Extend the carried per-row state for n_new joined rows."""

    def drop(self, keep: list[int]) -> None:
        """Keep only these batch rows (indices), e.g. after aborts."""
        self.batch.select(keep)
        self.seeds = self.seeds[keep]
        for name in self.carried:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])

    def close(self) -> None:
        """The batch is empty: keep what this loop learnt for the next one."""


class ArLoop(ModeLoop):
    def step(self) -> None:
        self.seeds = _ar_step(self.batch, self.out, self.cfg, self.gen, self.seeds)


class DiffusionLoop(ModeLoop):
    """Blocks [seed, mask x (B-1)] denoised with confidence commits; a causal commit pass per block. commit_log, when
    given, receives each block's per-position commit step counts."""

    def __init__(self, batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator,
                 commit_log: list | None = None):
        super().__init__(batch, out, cfg, gen)
        self.commit_log = commit_log

    def step(self) -> None:
        batch, cfg, gen, seeds = self.batch, self.cfg, self.gen, self.seeds
        width = cfg.block_size
        max_steps = cfg.max_steps or max(width - 1, 1)
        block = torch.full((len(batch), width), batch.model.mask_token_id, dtype=torch.long, device=seeds.device)
        block[:, 0] = seeds
        masked = torch.ones_like(block, dtype=torch.bool)
        masked[:, 0] = False
        commits = torch.zeros_like(block, dtype=torch.int32)
        step = 0
        while any(pending := masked.any(1).tolist()):
            step += 1
            logits = batch.forward(block, "denoise", counted=pending)
            pred, conf = select_with_confidence(logits, cfg.temperature, gen, cfg.top_k, cfg.top_p)
            choose = _pick_positions(conf, masked, cfg, last_step=step >= max_steps)
            block = torch.where(choose, pred, block)
            commits += choose.to(torch.int32)
            masked &= ~choose
        if self.commit_log is not None:
            self.commit_log.append(commits.clone())
        logits = batch.forward(block, "commit", logits_index=slice(width - 1, width))
        batch.advance([width] * len(batch))
        seeds = select_tokens(logits[:, -1], cfg.temperature, gen, cfg.top_k, cfg.top_p)
        self.seeds = _commit_rows(batch, self.out, torch.cat([block[:, 1:], seeds[:, None]], 1).tolist(), seeds)


class SelfSpecLoop(ModeLoop):
    """Draft [seed, mask x k] bidirectionally (adapter on), verify causally (adapter off), keep prefix + bonus.
    With draft_len="auto", k is chosen per cycle (0: an AR step). With prompt lookup, a row's lookup tokens fill the
    start of its draft block (the diffusion pass drafts past the end of the match, seeing it) and are verified as
    drafts; a cycle may also skip the draft forward and verify the lookups alone (when every row found one: always
    without draft_len="auto", else when the planner says it pays)."""

    def __init__(self, batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator):
        super().__init__(batch, out, cfg, gen)
        self.planner = _planner(batch, cfg, quadratic=False)
        self.found: Lookups | None = None  # lookups an AR run already made for the next cycle

    def _join_carried(self, n_new: int) -> None:
        self.found = None  # the joined rows have none: look up again

    def drop(self, keep: list[int]) -> None:
        super().drop(keep)
        self.found = None

    def close(self) -> None:
        _remember(self.batch, self.planner)

    def step(self) -> None:
        batch, out, cfg, gen, seeds, planner = self.batch, self.out, self.cfg, self.gen, self.seeds, self.planner
        n_rows = len(batch)
        looked, self.found = self.found or _lookup_drafts(batch, out, cfg, cfg.draft_len), None
        lookups, orders = looked
        all_found = _all_found(looked)
        longest = max(map(len, lookups)) if all_found else 0
        if planner:
            row = planner.critical(batch.rows, batch.committed())
            at = batch.rows.index(row) if row is not None else 0  # the priced row (a single row: row 0)
            own = len(lookups[at]) if all_found and row is not None else longest
            k, use_lookup, lookup_cut = planner.choose(batch, own, row=row,
                                                       lookup_order=orders[at] if all_found else None)
            if not use_lookup:
                _note_choice(batch, out, k)
                if k and lookups is not None and lookup_cut is not None:  # diffusion drafts only
                    lookups = [found[:lookup_cut] for found in lookups]
        else:
            k, use_lookup = (longest, True) if all_found else (cfg.draft_len, False)
        draft_logits = None
        if use_lookup:  # no draft forward; the planner may cut the lookups short
            drafts = merge_drafts([found[:k] for found in lookups], None, k, batch.model.mask_token_id, seeds.device)
        elif k == 0:
            self.seeds, self.found = _ar_run(batch, out, cfg, gen, seeds, planner, lookups=lookups is not None)
            return
        else:
            leads = [found[:k] for found in lookups] if lookups is not None else None
            drafts, draft_logits = batch.draft(seeds, k, leads, temperature=cfg.temperature, generator=gen,
                                               top_k=cfg.top_k, top_p=cfg.top_p)
        starts = list(batch.lengths)
        target = batch.forward(torch.cat([seeds[:, None], drafts], 1), "verify")
        tokens, n_acc = _verify(target, drafts, draft_logits, cfg, gen, batch, self.cycle)
        accepted, drafted, emitted = _to_host(n_acc, drafts, tokens)
        batch.advance([a + 1 for a in accepted])
        if planner:
            planner.record(accepted, k, lookup=use_lookup, lookup_lens=[len(f) for f in lookups] if lookups else None,
                           rows=batch.rows, lookup_orders=orders)
            planner.finish(k, lookup=use_lookup)
        new = _record(batch, out, starts, accepted, drafted, emitted, lookups)
        seeds = tokens[torch.arange(n_rows, device=tokens.device), n_acc].long()
        self.seeds = _commit_rows(batch, out, new, seeds)
        self.cycle += 1


class QuadraticLoop(ModeLoop):
    """Single-forward self-speculation: one forward verifies the drafts d_1..d_k after the seed d_0 and drafts the
    next block. Input [d_0..d_k, then k+1 sub-blocks of k'+1 masks] (layout: masks.quadratic_pattern); row d_i is
    causal (adapter off), sub-block i's masks see d_0..d_i and themselves (adapter on). After n accepted drafts the
    bonus token is AR's prediction at row d_n and the next drafts are sub-block n's mask predictions 2..k'+1 (its
    first mask sits where the bonus token goes). The first forward has no drafts to verify: it only drafts.
    k' = k except with draft_len="auto", which picks it per cycle (0: no masks, a plain verify forward, or an AR
    step when there are no drafts to verify either). Rows that join mid-decode carry filler drafts (the mask token,
    as a point-mass draft distribution) that verification keeps only where AR emits that very token: lossless."""

    carried = ("drafts", "draft_logits")

    def __init__(self, batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator):
        super().__init__(batch, out, cfg, gen)
        self.planner = _planner(batch, cfg, quadratic=True)
        self.drafts = torch.empty(len(batch), 0, dtype=torch.long, device=self.seeds.device)
        self.draft_logits: torch.Tensor | None = None

    def close(self) -> None:
        _remember(self.batch, self.planner)

    def _join_carried(self, n_new: int) -> None:
        mask_id = self.batch.model.mask_token_id
        width = self.drafts.shape[1]
        filler = torch.full((n_new, width), mask_id, dtype=torch.long, device=self.drafts.device)
        self.drafts = torch.cat([self.drafts, filler])
        if self.draft_logits is not None:
            point = torch.full((n_new, width, self.draft_logits.shape[-1]), float("-inf"),
                               dtype=self.draft_logits.dtype, device=self.draft_logits.device)
            point[..., mask_id] = 0.0
            self.draft_logits = torch.cat([self.draft_logits, point])

    def step(self) -> None:
        batch, out, cfg, gen, seeds, planner = self.batch, self.out, self.cfg, self.gen, self.seeds, self.planner
        drafts, draft_logits = self.drafts, self.draft_logits
        mask_id = batch.model.mask_token_id
        n_rows, n_drafts = drafts.shape
        next_len = (planner.choose(batch, verifying=n_drafts, row=planner.critical(batch.rows, batch.committed()))[0]
                    if planner else cfg.draft_len)
        if planner:
            _note_choice(batch, out, next_len)
            if not n_drafts and not next_len:  # nothing to verify, nothing to draft: plain AR steps at AR's cost
                self.seeds, _ = _ar_run(batch, out, cfg, gen, seeds, planner, lookups=False)
                self.drafts = torch.empty(len(batch), 0, dtype=torch.long, device=seeds.device)
                self.draft_logits = None
                return
        masks_per_row = next_len + 1 if next_len else 0
        lookups, orders = _lookup_drafts(batch, out, cfg, n_drafts) if n_drafts else NO_LOOKUPS
        if lookups is not None:
            drafts = merge_drafts(lookups, drafts, n_drafts, mask_id, seeds.device)
        verify_rows = n_drafts + 1
        masks = torch.full((n_rows, verify_rows * masks_per_row), mask_id, dtype=torch.long, device=seeds.device)
        logits = batch.forward(torch.cat([seeds[:, None], drafts, masks], 1), "verify_draft",
                               masks_per_row=masks_per_row)
        starts = list(batch.lengths)
        rows = torch.arange(n_rows, device=seeds.device)
        if n_drafts:
            tokens, n_acc = _verify(logits[:, :verify_rows], drafts, draft_logits, cfg, gen, batch, self.cycle)
            accepted, drafted, emitted = _to_host(n_acc, drafts, tokens)
            new = _record(batch, out, starts, accepted, drafted, emitted, lookups)
            if planner:
                planner.record(accepted, n_drafts, lookup_lens=[len(f) for f in lookups] if lookups else None,
                               rows=batch.rows, lookup_orders=orders)
        else:
            tokens = select_tokens(logits[:, :1], cfg.temperature, gen, cfg.top_k, cfg.top_p)
            n_acc = torch.zeros(n_rows, dtype=torch.long, device=seeds.device)
            accepted, new = [0] * n_rows, tokens.tolist()
        batch.advance([a + 1 for a in accepted])
        if planner:
            planner.finish(next_len)
        if masks_per_row:
            sub_blocks = logits[:, verify_rows:].reshape(n_rows, verify_rows, masks_per_row, -1)
            draft_logits = sub_blocks[rows, n_acc, 1:]
            drafts = select_tokens(draft_logits, cfg.temperature, gen, cfg.top_k, cfg.top_p)
        else:
            draft_logits, drafts = None, torch.empty(n_rows, 0, dtype=torch.long, device=seeds.device)
        seeds = tokens[rows, n_acc].long()
        if draft_logits is None:
            self.seeds, self.drafts = _commit_rows(batch, out, new, seeds, drafts)
            self.draft_logits = None
        else:
            self.seeds, self.drafts, self.draft_logits = _commit_rows(batch, out, new, seeds, drafts, draft_logits)
        self.cycle += 1


LOOPS: dict[str, type[ModeLoop]] = {"ar": ArLoop, "diffusion": DiffusionLoop, "self_spec": SelfSpecLoop,
                                    "self_spec_quadratic": QuadraticLoop}


def run_to_end(mode: str, batch: DecodeBatch, out: Outputs, cfg: DecodeSettings, gen: torch.Generator,
               **options) -> None:
    """Decode every row of a fresh batch to its end (options: the mode loop's own, e.g. commit_log)."""
    loop = LOOPS[mode](batch, out, cfg, gen, **options)
    while len(batch):
        loop.step()
    loop.close()
