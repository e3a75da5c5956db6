"""Word-level WikiText-2 models for :mod:`benchmarks.nontermination`: data, training, perplexity.

Sequences are sentences (:func:`benchmarks.data.load_wikitext` with ``unit="sentence"``), as in Welleck et
al. 2020: a 10-token context leaves a reference of sentence length (17 tokens on average with eos), so a
model that has learnt where sentences end should stop long before ``L = 1,500``.

Models are trained on whole sentences (every token but the first is a target; a self-terminating head
counts ``t`` from the first predicted position). Perplexity is measured on the *continuation* tokens
(eos included) of validation and test sentences, given their first 10 tokens as context - the same split
the decoders see - with the head's ``t`` counted from the first continuation token, as in decoding.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.data import Vocabulary, load_wikitext, split_context
from decoding.models import RecurrentLM, load_recurrent_lm, lstm_lm, rnn_lm, save_recurrent_lm
from training.lm import collate_lm_batch, evaluate_perplexity, train_lm

__all__ = ["WordSettings", "WordData", "WordModelSpec", "load_word_data", "train_or_load_word_model"]

CONTEXT_LEN = 10


@dataclass(frozen=True)
class WordSettings:
    """Data, model and training sizes for the RNN / LSTM models (all hashed into the cache key).

    ``None`` means "everything" for the limits. Hidden sizes and dropouts default to the papers'.
    """

    max_lines: int | None = None  # raw lines read per split (tests); None: the whole files
    vocab_size: int | None = None  # full WikiText-2 vocabulary (33,278 words + pad/eos)
    train_tokens: int | None = None  # training tokens per epoch (a seeded sample of sentences)
    eval_sentences: int | None = None  # validation / test sentences scored for perplexity
    prompts: int | None = None  # test sentences decoded (None: all with more than 10 tokens)
    rnn_hidden: int = 256
    lstm_hidden: int = 512
    rnn_dropout: float = 0.3
    lstm_dropout: float = 0.5
    layers: int = 2
    epochs: int = 40
    patience: int = 3
    lr: float = 1e-3
    lr_decay: float = 0.5
    batch_sentences: int = 64


@dataclass(frozen=True)
class WordModelSpec:
    """One RNN / LSTM model to train: ``cell`` in {rnn, lstm}, ``head`` in {vanilla, st, nmst}."""

    name: str
    cell: str
    head: str
    epsilon: float | None = None


@dataclass
class WordData:
    """Everything the word-level models need, built once per run."""

    vocab: Vocabulary
    train_batches: list[dict[str, torch.Tensor]]
    valid_batches: list[dict[str, torch.Tensor]]
    test_batches: list[dict[str, torch.Tensor]]
    prompts: torch.Tensor  # [N, 10] test contexts
    reference_lengths: list[int]  # [N] continuation lengths, eos included
    train_tokens: int


def _sorted_batches(
    sequences: Sequence[Sequence[int]], *, size: int, pad: int, context: int | None
) -> list[dict[str, torch.Tensor]]:
    """Length-sorted batches of ``size`` sequences (little padding); ``context`` leading tokens unscored."""
    ordered = sorted(sequences, key=len)
    batches = []
    for first in range(0, len(ordered), size):
        chunk = ordered[first : first + size]
        lengths = None if context is None else [context] * len(chunk)
        batches.append(collate_lm_batch(chunk, pad_token_id=pad, context_lengths=lengths))
    return batches


def _sample(items: Sequence, count: int | None, rng: random.Random) -> list:
    """A seeded sample of ``count`` items in their original order (all items when None or too few)."""
    if count is None or count >= len(items):
        return list(items)
    keep = sorted(rng.sample(range(len(items)), count))
    return [items[index] for index in keep]


def load_word_data(data_dir: str | None, settings: WordSettings, *, seed: int) -> WordData:
    """Sentences, vocabulary, training / scoring batches and decoding prompts."""
    splits = load_wikitext(data_dir, unit="sentence", max_lines=settings.max_lines)
    vocab = Vocabulary.build(splits["train"], max_size=settings.vocab_size)
    rng = random.Random(seed)
    train = [vocab.encode(sentence) for sentence in splits["train"]]
    rng.shuffle(train)
    if settings.train_tokens is not None:
        kept, total = [], 0
        for sequence in train:
            if total >= settings.train_tokens:
                break
            kept.append(sequence)
            total += len(sequence) - 1
        train = kept
    scored = {}
    for split in ("valid", "test"):
        long_enough = [vocab.encode(s) for s in splits[split] if len(s) > CONTEXT_LEN]
        scored[split] = _sample(long_enough, settings.eval_sentences, rng)
    contexts, references = split_context([vocab.encode(s) for s in splits["test"]], context_len=CONTEXT_LEN)
    chosen = _sample(list(range(len(contexts))), settings.prompts, rng)
    size, pad = settings.batch_sentences, vocab.pad_id
    return WordData(
        vocab=vocab,
        train_batches=_sorted_batches(train, size=size, pad=pad, context=None),
        valid_batches=_sorted_batches(scored["valid"], size=size, pad=pad, context=CONTEXT_LEN),
        test_batches=_sorted_batches(scored["test"], size=size, pad=pad, context=CONTEXT_LEN),
        prompts=torch.tensor([contexts[index] for index in chosen], dtype=torch.long),
        reference_lengths=[len(references[index]) for index in chosen],
        train_tokens=sum(len(sequence) - 1 for sequence in train),
    )


def build_word_model(spec: WordModelSpec, settings: WordSettings, vocab: Vocabulary) -> RecurrentLM:
    """An untrained RNN / LSTM LM of the settings' size."""
    factory, hidden, dropout = (
        (rnn_lm, settings.rnn_hidden, settings.rnn_dropout)
        if spec.cell == "rnn"
        else (lstm_lm, settings.lstm_hidden, settings.lstm_dropout)
    )
    return factory(
        len(vocab), eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id, head=spec.head, epsilon=spec.epsilon,
        hidden_size=hidden, num_layers=settings.layers, dropout=dropout,
    )  # fmt: skip


def train_or_load_word_model(
    spec: WordModelSpec, settings: WordSettings, data: WordData, *, folder: Path, seed: int, progress: bool
) -> tuple[RecurrentLM, dict]:
    """Train ``spec`` (resuming from ``folder``'s checkpoint) or load it; returns the model in eval mode
    and its record (perplexities, epochs, training tokens, seconds)."""
    weights, record_path = folder / f"{spec.name}.pt", folder / f"{spec.name}.json"
    if weights.is_file() and record_path.is_file():
        return load_recurrent_lm(weights).eval(), json.loads(record_path.read_text())
    torch.manual_seed(seed)
    model = build_word_model(spec, settings, data.vocab)
    start = time.perf_counter()
    history = train_lm(
        model, data.train_batches, data.valid_batches, epochs=settings.epochs, lr=settings.lr,
        patience=settings.patience, lr_decay=settings.lr_decay, checkpoint_dir=folder / f"{spec.name}.ckpt",
        seed=seed, progress=progress,
    )  # fmt: skip
    model.eval()
    valid = history.best_valid_perplexity
    record = {
        "valid_perplexity": valid,
        "vocab_size": len(data.vocab),
        # no better than a uniform guess over the vocabulary: diverged (or barely trained)
        "worse_than_uniform": not valid < len(data.vocab),
        "test_perplexity": evaluate_perplexity(model, data.test_batches, progress=progress),
        "epochs": len(history.epochs),
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "train_tokens_per_epoch": data.train_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": time.perf_counter() - start,  # this process only (a resumed run counts its part)
    }
    save_recurrent_lm(model, weights)
    tmp = record_path.with_name(record_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, record_path)
    return model, record

