"""A joint subword tokenizer trained on the training split with the ``tokenizers`` library.

The tokenizer is a byte-pair encoding over Metaspace pre-tokens (``▁`` marks a word start), wrapped in a
:class:`transformers.PreTrainedTokenizerFast` so that ``save_pretrained`` writes it into the same folder
as the model and ``AutoTokenizer.from_pretrained(folder)`` restores it. Decoding with
``skip_special_tokens=True`` gives back detokenised text (spaces restored from ``▁``), which is what
sacrebleu scores.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "train_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 2
                    ) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on ``texts`` (e.g. both sides of the training split).

    Ids 0-3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``. No special tokens are added on encoding;
    callers append eos themselves (see :func:`training.parallel_text.encode_parallel`).
    """
    if vocab_size < 16:
        raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS.values()))
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False,
                                   **SPECIAL_TOKENS)
