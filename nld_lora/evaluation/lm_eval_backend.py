"""lm-evaluation-harness backend (optional extra `nld_lora[eval]`): standard suites scored per decoding mode.

`generate_until` decodes through this project's runtime in the chosen mode (adapter and draft length as given);
`loglikelihood` and `loglikelihood_rolling` score text with the AR pathway (adapters off), one causal forward per
request. Registered as model "nld_lora", so `lm_eval --model nld_lora --model_args pretrained=PATH,mode=self_spec`
works too. Offline: tasks whose data live on the hub cannot load; a task YAML with `dataset_path: json` and local
`data_files` runs anywhere (`include_path`).
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from nld_lora.model.masks import causal_mask

MODES = ("ar", "diffusion", "self_spec", "self_spec_quadratic")


class TaskError(ValueError):
    """A task lm-eval cannot find or load."""


@register_model("nld_lora")
class NLDLM(LM):
    """lm-eval's LM interface over a TriModeModel (given, or loaded from `pretrained`)."""

    def __init__(self, pretrained: str | None = None, model: Any = None, mode: str = "self_spec",
                 adapter: str | None = None, draft_len: int | None = None, batch_size: int = 8,
                 max_gen_toks: int = 256, **decode: Any):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if model is None:
            import nld_lora

            model = nld_lora.load(pretrained or "data/tiny-nld-code")
        self.model = model
        self.adapter = model.attach_adapter(adapter) if adapter and adapter not in model.adapters else adapter
        self.mode, self.batch_size, self.max_gen_toks = mode, int(batch_size), int(max_gen_toks)
        self.decode = {"draft_len": int(draft_len)} if draft_len is not None else {}
        self.decode.update(decode)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _token_logprobs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(ids[i] | ids[:i]) for i >= 1 through the AR pathway, and whether each was the argmax."""
        x = torch.tensor([ids], device=self.model.device)
        n = x.shape[1]
        with self.model.adapter_enabled(None, False):
            logits, _ = self.model(x, attention_mask=causal_mask(torch.ones(1, n, dtype=torch.bool,
                                                                            device=x.device), n),
                                   position_ids=torch.arange(n, device=x.device)[None])
        logp = logits[0, :-1].float().log_softmax(-1)
        target = x[0, 1:]
        return logp.gather(-1, target[:, None])[:, 0], logp.argmax(-1) == target

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self._encode(context) or [self._prefix_id()]
            whole = self._encode(context + continuation)
            if whole[: len(ctx)] != ctx:  # the boundary token merged: score the continuation's own tokens
                whole = ctx + self._encode(continuation)
            logp, greedy = self._token_logprobs(whole)
            k = len(whole) - len(ctx)
            out.append((float(logp[-k:].sum()) if k else 0.0, bool(greedy[-k:].all()) if k else True))
        return out

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Whole-text log-likelihood; the first token is conditioned on the EOS id (lm-eval's convention)."""
        out = []
        for req in requests:
            ids = [self._prefix_id(), *self._encode(req.args[0])]
            logp, _ = self._token_logprobs(ids)
            out.append(float(logp.sum()))
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        out: list[str] = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            until = kwargs.get("until") or []
            key = (tuple([until] if isinstance(until, str) else until),
                   int(kwargs.get("max_gen_toks", self.max_gen_toks)), float(kwargs.get("temperature", 0.0) or 0.0))
            groups.setdefault(key, []).append(i)
        for (until, max_new, temperature), idx in groups.items():
            res = self.model.generate([requests[i].args[0] for i in idx], mode=self.mode, max_new_tokens=max_new,
                                      batch_size=self.batch_size, adapter=self.adapter or False,
                                      temperature=temperature, **self.decode)
            for i, text in zip(idx, res.texts):
                out[i] = _cut(text, until, self.tokenizer)
        return out

    def _prefix_id(self) -> int:
        return min(self.model.eos_token_ids) if self.model.eos_token_ids else 0


def _cut(text: str, until: tuple[str, ...], tokenizer: Any) -> str:
    """The text up to the first stop string (and without the EOS token's text)."""
    eos = getattr(tokenizer, "eos_token", None)
    for stop in (*until, *([eos] if eos else [])):
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def run_tasks(model: Any, tasks: list[str], *, plans: dict[str, dict[str, Any]], include_path: str | None = None,
              limit: int | None = None, batch_size: int = 8, **decode: Any) -> dict[str, Any]:
    """lm-eval's simple_evaluate per planned run (nld_lora.modes.mode_plan); {label: {task: metrics}}. Unknown or
    unloadable tasks are named."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        local = _local_tasks(manager, include_path) if include_path else []
        raise TaskError(f"unknown lm-eval task(s) {unknown}" + (f"; tasks in {include_path}: {local}" if local else ""))
    results: dict[str, Any] = {}
    for label, plan in plans.items():
        settings = {k: v for k, v in plan.items() if k not in ("mode", "adapter")}
        lm = NLDLM(model=model, mode=plan["mode"], adapter=plan["adapter"] or None, batch_size=batch_size,
                   **decode, **settings)
        try:
            run = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
        except Exception as err:  # datasets raises its own connection / file errors for hub tasks offline
            raise TaskError(f"lm-eval could not run tasks {tasks} ({type(err).__name__}: {err}); without the hub, "
                            "use a task YAML with dataset_path: json and local data_files (include_path)") from err
        results[label] = run["results"]
    return results


def _local_tasks(manager: Any, include_path: str) -> list[str]:
    """Task names whose YAML lies under include_path."""
    from pathlib import Path

    root = Path(include_path).resolve()
    return sorted(name for name, entry in manager.task_index.items()
                  if root in Path(str(getattr(entry, "yaml_path", "") or "/")).resolve().parents)
