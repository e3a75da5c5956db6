"""Word-level WikiText-2 models for :mod:`benchmarks.nontermination`: data, training, perplexity.

The self-terminating papers' protocol (Welleck et al. 2020; Choi et al. 2023). Sequences are sentences
(:func:`benchmarks.datasets.load_wikitext` with ``unit="sentence"``) ending in eos; a sentence shorter than the
10-token context is left-padded with ``<cpad>``, so every sentence has a 10-token context and a reference
continuation of at least the eos. Training scores the continuation tokens only (the context's labels are
-100), so a self-terminating head's clock ``t`` starts at the first continuation token in training, in
perplexity and in decoding alike. Perplexity is measured on the continuation tokens (eos included) of
validation and test sentences.

Training cost is dominated by the output layer over the full vocabulary; it runs on the scored positions
only (:meth:`~decoding.models.RecurrentLM.scored_loss`) and, where asked, under bfloat16 autocast. With
``head_epochs = k`` the ST / NMST models are trained at equal compute with the vanilla one: they start from
the vanilla model's checkpoint after ``epochs - k`` epochs (weights, optimizer, learning rate) and train
``k`` epochs with their head, while the vanilla model trains those ``k`` epochs with its own.

After every epoch, greedy decoding of a fixed set of validation contexts (up to the benchmark's L) logs
``r_L``, the mean length and the share of distinct continuations, as both papers' training loops do.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import write_json
from benchmarks.datasets import Vocabulary, load_wikitext, pad_context, split_context
from decoding.generate import generate
from decoding.models import RecurrentLM, load_recurrent_lm, lstm_lm, rnn_lm, save_recurrent_lm
from training.checkpoint import atomic_copy, atomic_save
from training.distributed import barrier, current_ranks
from training.lm import LAST_CHECKPOINT, collate_lm_batch, evaluate_perplexity, train_lm

__all__ = ["WordSettings", "WordData", "WordModelSpec", "load_word_data", "train_or_load_word_model",
           "distinct_share"]  # fmt: skip

CONTEXT_LEN = 10
CONTEXT_PAD = "<cpad>"


@dataclass(frozen=True)
class WordSettings:
    """Data, model and training sizes for the RNN / LSTM models (all hashed into the cache key).

    ``None`` means "everything" for the limits. Hidden sizes and dropouts default to the papers'.
    """

    max_lines: int | None = None  # raw lines read per split (tests); None: the whole files
    vocab_size: int | None = None  # full WikiText-2 vocabulary (33,278 words + pad/eos/<cpad>)
    train_tokens: int | None = None  # training tokens per epoch (a seeded sample of sentences)
    eval_sentences: int | None = None  # validation / test sentences scored for perplexity
    prompts: int | None = None  # test sentences decoded (None: all)
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
    cells: tuple[str, ...] = ("rnn", "lstm")
    head_epochs: int | None = None  # None: every head trains from scratch; k: see the module docstring
    valid_prompts: int = 1000  # validation contexts decoded greedily after every epoch (0: none)
    autocast: str | None = None  # "bfloat16": train under torch.autocast (evaluation stays in float32)

    @property
    def shares_epochs(self) -> bool:
        """ST / NMST models start from the vanilla model's checkpoint (equal compute, see the module)."""
        return self.head_epochs is not None and self.head_epochs < self.epochs


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
    valid_prompts: torch.Tensor  # [M, 10] validation contexts for the per-epoch greedy r_L
    train_tokens: int
    target_counts: torch.Tensor  # [V] how often each token is a training target (the output bias's prior)


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
    """Sentences, vocabulary (with ``<cpad>``), training / scoring batches and decoding prompts."""
    splits = load_wikitext(data_dir, unit="sentence", max_lines=settings.max_lines)
    built = Vocabulary.build(splits["train"], max_size=None if settings.vocab_size is None else settings.vocab_size - 1)
    vocab = Vocabulary(built.tokens + (CONTEXT_PAD,))
    cpad = vocab.encode([CONTEXT_PAD])[0]
    rng = random.Random(seed)

    def encoded(split: str) -> list[list[int]]:
        return pad_context([vocab.encode(s) for s in splits[split]], context_len=CONTEXT_LEN, pad=cpad)

    train = encoded("train")
    rng.shuffle(train)
    if settings.train_tokens is not None:
        kept, total = [], 0
        for sequence in train:
            if total >= settings.train_tokens:
                break
            kept.append(sequence)
            total += len(sequence) - 1
        train = kept
    valid, test = encoded("valid"), encoded("test")
    scored = {"valid": _sample(valid, settings.eval_sentences, rng), "test": _sample(test, settings.eval_sentences, rng)}
    contexts, references = split_context(test, context_len=CONTEXT_LEN)
    chosen = _sample(list(range(len(contexts))), settings.prompts, rng)
    valid_contexts, _ = split_context(valid, context_len=CONTEXT_LEN)
    valid_chosen = _sample(valid_contexts, settings.valid_prompts, rng) if settings.valid_prompts else []
    size, pad = settings.batch_sentences, vocab.pad_id
    train_batches = _sorted_batches(train, size=size, pad=pad, context=CONTEXT_LEN)
    targets = torch.cat([batch["labels"][batch["labels"] != -100] for batch in train_batches])
    return WordData(
        vocab=vocab,
        train_batches=train_batches,
        valid_batches=_sorted_batches(scored["valid"], size=size, pad=pad, context=CONTEXT_LEN),
        test_batches=_sorted_batches(scored["test"], size=size, pad=pad, context=CONTEXT_LEN),
        prompts=torch.tensor([contexts[index] for index in chosen], dtype=torch.long),
        reference_lengths=[len(references[index]) for index in chosen],
        valid_prompts=torch.tensor(valid_chosen, dtype=torch.long).view(-1, CONTEXT_LEN),
        train_tokens=sum(len(sequence) - 1 for sequence in train),
        target_counts=torch.bincount(targets, minlength=len(vocab)),
    )


def distinct_share(continuations: Sequence[Sequence[int]]) -> float:
    """Share of distinct continuations among ``continuations`` (1: all differ; 1/N: all the same)."""
    if not continuations:
        raise ValueError("continuations is empty")
    return len({tuple(c) for c in continuations}) / len(continuations)


def greedy_probe(
    prompts: torch.Tensor, *, eos_token_id: int, pad_token_id: int, max_new_tokens: int, batch_size: int,
) -> Callable[[RecurrentLM, int], dict[str, float]]:  # fmt: skip
    """``(model, epoch) -> {greedy_nontermination, greedy_mean_length, greedy_distinct}`` on ``prompts``."""

    def probe(model: RecurrentLM, epoch: int) -> dict[str, float]:
        on_device = prompts.to(next(model.parameters()).device)
        out = generate(
            model, on_device, torch.ones_like(on_device), max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, do_sample=False, num_beams=1, return_dict_in_generate=True,
            max_batch_size=batch_size,
        )  # fmt: skip
        generated = out.sequences[:, prompts.shape[1] :].tolist()
        rows = [row[:length] for row, length in zip(generated, out.lengths.tolist())]
        return {
            "greedy_nontermination": float((~out.terminated).float().mean()),
            "greedy_mean_length": float(out.lengths.float().mean()),
            "greedy_distinct": distinct_share(rows),
        }

    return probe


def build_word_model(
    spec: WordModelSpec, settings: WordSettings, vocab: Vocabulary, target_counts: torch.Tensor | None = None
) -> RecurrentLM:
    """An untrained RNN / LSTM LM of the settings' size.

    With ``target_counts`` the output bias starts at the log unigram distribution of the training targets
    (add-one smoothed), so training starts from the unigram model instead of spending its first hundreds of
    updates on reaching it: on WikiText-2 at a 10k vocabulary, validation perplexity after 300k tokens went
    from 451 to 237 with this alone.
    """
    factory, hidden, dropout = (
        (rnn_lm, settings.rnn_hidden, settings.rnn_dropout)
        if spec.cell == "rnn"
        else (lstm_lm, settings.lstm_hidden, settings.lstm_dropout)
    )
    model = factory(
        len(vocab), eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id, head=spec.head, epsilon=spec.epsilon,
        hidden_size=hidden, num_layers=settings.layers, dropout=dropout,
    )  # fmt: skip
    if target_counts is not None:
        smoothed = target_counts.double() + 1.0
        with torch.no_grad():
            model.output.bias.copy_((smoothed / smoothed.sum()).log())
    return model


def _autocast_dtype(settings: WordSettings) -> torch.dtype | None:
    if settings.autocast is None:
        return None
    if settings.autocast != "bfloat16":
        raise ValueError(f"autocast must be None or 'bfloat16', got {settings.autocast!r}")
    return torch.bfloat16


def _scored_loss(model: RecurrentLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.scored_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])


def vanilla_start(folder: Path, cell: str) -> Path:
    """Where the vanilla model's checkpoint after ``epochs - head_epochs`` epochs is kept."""
    return folder / f"{cell}-vanilla.start.pt"


def _start_from_vanilla(start: Path, checkpoint_dir: Path) -> None:
    """Seed a head model's checkpoint folder with the vanilla checkpoint: weights, optimizer, learning rate
    and the epochs so far (their metrics describe the shared vanilla epochs); the best-so-far is reset, so
    the head's own epochs decide which weights are kept."""
    if (checkpoint_dir / LAST_CHECKPOINT).is_file():
        return
    payload = torch.load(start, map_location="cpu", weights_only=True)
    payload["history"] = {**payload["history"], "best_epoch": None, "best_valid_perplexity": float("inf")}
    payload["bad_epochs"] = 0
    atomic_save(payload, checkpoint_dir / LAST_CHECKPOINT)


def train_or_load_word_model(
    spec: WordModelSpec, settings: WordSettings, data: WordData, *, folder: Path, seed: int, progress: bool,
    max_new_tokens: int, batch_size: int, device: torch.device | str = "cpu",
) -> tuple[RecurrentLM, dict]:  # fmt: skip
    """Train ``spec`` (resuming from ``folder``'s checkpoint) or load it; returns the model in eval mode
    and its record (perplexities, per-epoch history, training tokens, seconds).

    With ``settings.head_epochs``, a vanilla model also leaves :func:`vanilla_start` behind, and an ST /
    NMST model needs it (train the cell's vanilla model first).
    """
    weights, record_path = folder / f"{spec.name}.pt", folder / f"{spec.name}.json"
    if weights.is_file() and record_path.is_file():
        return load_recurrent_lm(weights).to(device).eval(), json.loads(record_path.read_text())
    ranks = current_ranks()  # under torchrun: trained together (training.lm.train_lm), written by rank 0
    torch.manual_seed(seed)
    model = build_word_model(spec, settings, data.vocab, data.target_counts).to(device)
    checkpoint_dir = folder / f"{spec.name}.ckpt"
    shared = settings.shares_epochs
    if shared and spec.head != "vanilla":
        start = vanilla_start(folder, spec.cell)
        if not start.is_file():
            raise FileNotFoundError(f"{start} is missing: train {spec.cell}-vanilla first (head_epochs is set)")
        if ranks.main:
            _start_from_vanilla(start, checkpoint_dir)
        barrier(ranks)
    probe = None
    if len(data.valid_prompts):
        probe = greedy_probe(data.valid_prompts, eos_token_id=data.vocab.eos_id, pad_token_id=data.vocab.pad_id,
                             max_new_tokens=max_new_tokens, batch_size=batch_size)  # fmt: skip
    common = dict(
        lr=settings.lr, patience=settings.patience, lr_decay=settings.lr_decay, checkpoint_dir=checkpoint_dir,
        seed=seed, progress=progress, loss_fn=_scored_loss, autocast_dtype=_autocast_dtype(settings),
        on_epoch_end=probe,
    )  # fmt: skip
    start_time = time.perf_counter()
    if shared and spec.head == "vanilla":
        start = vanilla_start(folder, spec.cell)
        if not start.is_file():
            train_lm(model, data.train_batches, data.valid_batches, epochs=settings.epochs - settings.head_epochs,
                     **common)  # fmt: skip
            if ranks.main:
                atomic_copy(checkpoint_dir / LAST_CHECKPOINT, start)
            barrier(ranks)
    history = train_lm(model, data.train_batches, data.valid_batches, epochs=settings.epochs, **common)
    model.eval()
    valid = evaluate_perplexity(model, data.valid_batches, progress=progress, loss_fn=_scored_loss)
    record = {
        "valid_perplexity": valid,
        "vocab_size": len(data.vocab),
        # no better than a uniform guess over the vocabulary: diverged (or barely trained)
        "worse_than_uniform": not valid < len(data.vocab),
        "test_perplexity": evaluate_perplexity(model, data.test_batches, progress=progress, loss_fn=_scored_loss),
        "epochs": len(history.epochs),
        "head_epochs": settings.head_epochs if shared and spec.head != "vanilla" else None,
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "history": [asdict(epoch) for epoch in history.epochs],
        "train_tokens_per_epoch": data.train_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": time.perf_counter() - start_time,  # this process only (a resumed run counts its part)
    }
    if ranks.main:
        save_recurrent_lm(model, weights)
        write_json(record_path, record)
    barrier(ranks)
    return model, record
