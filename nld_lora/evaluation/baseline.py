"""The model a user serves today, measured like the tri-mode modes: any Hugging Face causal LM folder through
transformers' `generate` (greedy, and its prompt-lookup decoding), on the same prompts, with per-token times."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

LOOKUP_TOKENS = 10  # transformers' prompt_lookup_num_tokens, as its docs suggest


class BaselineError(ValueError):
    """A baseline folder that is not a causal LM transformers can load."""


class _TokenClock(BaseStreamer):
    """Records when `generate` emits each new token (the first put is the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        now = time.perf_counter() - self.start
        self.times.extend([now] * int(value.numel()))

    def end(self) -> None:
        pass


class Baseline:
    """A causal LM folder, loaded once; `generate` returns texts, sequences and per-request token times."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(folder)
        if not (path / "config.json").exists():
            raise BaselineError(f"baseline={folder}: not a model folder (no config.json)")
        try:
            model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                               output_loading_info=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (ValueError, OSError, KeyError) as err:
            raise BaselineError(f"baseline={folder}: not a causal LM transformers can load ({err})") from err
        if info["missing_keys"]:  # an NLD folder loads as a randomly initialised causal LM
            raise BaselineError(f"baseline={folder}: its weights do not fit {type(model).__name__} "
                                f"({len(info['missing_keys'])} missing, e.g. {sorted(info['missing_keys'])[0]}); "
                                "for a tri-mode folder, give its AR view (nld-lora export --ar-view OUT)")
        self.model = model.to(device).eval()
        self.name = str(folder)
        stops = self.model.generation_config.eos_token_id
        self.eos = ([stops] if isinstance(stops, int) else list(stops or [])) or \
            ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])

    def generate_one(self, prompt: str, max_new_tokens: int, lookup: bool) -> tuple[list[int], list[float], float]:
        """(new tokens, their emission times, wall seconds) for one request at batch 1."""
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.model.device)
        clock = _TokenClock()
        extra = {"prompt_lookup_num_tokens": LOOKUP_TOKENS} if lookup else {}
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=self.eos or None, streamer=clock,
                                      pad_token_id=self.eos[0] if self.eos else 0, **extra)
        wall = time.perf_counter() - clock.start
        return out[0, ids.shape[1]:].tolist(), clock.times, wall

    def run(self, prompts: list[str], max_new_tokens: int, lookup: bool) -> dict[str, Any]:
        """Every prompt at batch 1 (transformers' prompt lookup is batch-1 only): texts, sequences, times."""
        seqs, times, walls = [], [], []
        t0 = time.perf_counter()
        for prompt in prompts:
            seq, t, wall = self.generate_one(prompt, max_new_tokens, lookup)
            seqs.append(seq)
            times.append(t)
            walls.append(wall)
        total = time.perf_counter() - t0
        return {"sequences": seqs, "texts": [self.tokenizer.decode(s, skip_special_tokens=True) for s in seqs],
                "token_times": times,
                "walls": walls, "tokens_per_s": sum(map(len, seqs)) / total if total > 0 else 0.0}
