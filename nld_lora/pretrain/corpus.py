"""The pretraining corpus: a byte-level BPE tokenizer trained on it, and packed fixed-length rows."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from nld_lora.tokenization import train_byte_level_bpe

SPECIALS = ["<pad>", "<eos>", "<|mask|>"]
DOC_SEPARATOR = "\n\x00\n"  # between documents in corpus_*.txt (scripts/make_domain_data.py)


def documents(corpus: Path) -> list[str]:
    return corpus.read_text(encoding="utf-8").split(DOC_SEPARATOR)


def train_tokenizer(corpus: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = train_byte_level_bpe(documents(corpus), vocab_size, SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", mask_token="<|mask|>", model_max_length=1024,
    )


def pack(tokenizer, corpus: Path, seq_len: int) -> torch.Tensor:
    """Tokenize every document, join with EOS, cut into (n, seq_len) rows."""
    ids: list[int] = []
    for doc in documents(corpus):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def bytes_per_token(tokenizer, corpus: Path) -> float:
    """UTF-8 bytes per token over the corpus: converts per-token losses to per-byte ones."""
    docs = documents(corpus)
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    return sum(len(d.encode()) for d in docs) / tokens
