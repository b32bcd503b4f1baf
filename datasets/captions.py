"""Caption tokenizers for the Masked AutoDecoder's captioning task (``models/mad.py``): trained on the training
captions with Hugging Face ``tokenizers``, never downloaded."""

from __future__ import annotations

from typing import Sequence


def train_caption_tokenizer(captions: Sequence[str], vocab_size: int = 8000):
    """A word-level Hugging Face ``tokenizers.Tokenizer`` trained on ``captions`` (lower-cased, split on whitespace
    and punctuation; ``[PAD]`` = id 0, ``[UNK]`` = 1); nothing is downloaded."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(vocab_size=vocab_size,
                                                                special_tokens=["[PAD]", "[UNK]"]))
    return tok


__all__ = ["train_caption_tokenizer"]
