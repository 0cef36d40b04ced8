"""A byte-level BPE tokenizer trained in-process: the embedded base's, the release fixture's and the tests'."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, specials: list[str],
                         unk_token: str | None = None) -> Tokenizer:
    """Specials take ids 0..len(specials)-1 in order; every byte is in the alphabet."""
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
