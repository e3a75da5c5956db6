"""Maximum-likelihood training of language models on token sequences.

Works for the library's :class:`~decoding.models.RecurrentLM` (any head), transformers causal LMs and
encoder-decoders, and their self-terminating wrappers: anything called as
``model(input_ids=..., attention_mask=..., labels=...)`` that returns ``.loss``, the mean NLL of the
labelled tokens (transformers' convention: -100 marks tokens not predicted - context and padding).

A batch is a mapping with ``input_ids [B, T]``, ``attention_mask [B, T]`` and ``labels [B, T]``
(:func:`collate_lm_batch` builds one from token lists). Perplexity is ``exp`` of the mean NLL over all
labelled tokens of all batches.

Example::

    train = [collate_lm_batch(chunk, pad_token_id=pad) for chunk in chunks(train_sequences, 32)]
    history = train_lm(model, train, valid, epochs=40, lr=1e-3, patience=3,
                       checkpoint_dir="~/.cache/consistent-decoding/lstm-nmst")
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from decoding.metrics import perplexity

from .checkpoint import atomic_save
from .distributed import (Ranks, all_sum, backend_device, barrier, counts_of_all, current_ranks, row_range,
                          weight_of_counts)
from .loop import LoopPosition, Progress, autocast, gradient_step, run_loop
from .padding import pad_rows

__all__ = [
    "EpochRecord",
    "TrainingHistory",
    "collate_lm_batch",
    "evaluate_perplexity",
    "model_loss",
    "train_lm",
]

Batch = Mapping[str, torch.Tensor]
# (model, batch on the model's device) -> mean NLL of the batch's labelled tokens
LossFunction = Callable[[torch.nn.Module, Batch], torch.Tensor]
LAST_CHECKPOINT = "last.pt"
BEST_WEIGHTS = "best.pt"


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch: mean training loss (per token), validation perplexity, learning rate used, and
    whatever ``train_lm``'s ``on_epoch_end`` measured (e.g. a non-termination ratio)."""

    epoch: int
    train_loss: float
    valid_perplexity: float
    learning_rate: float
    improved: bool
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingHistory:
    """What :func:`train_lm` did. ``best_*`` refer to the weights left in the model at the end."""

    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    best_valid_perplexity: float = math.inf
    stopped_early: bool = False


def collate_lm_batch(
    sequences: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    context_lengths: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad token sequences into a training batch.

    Args:
        sequences: ``B`` token lists (e.g. one line each, ending in eos).
        pad_token_id: token written into the padding.
        context_lengths: per sequence, how many leading tokens are context (labels -100: not
            predicted, and ``p(eos) = 0`` for a self-terminating model). None: no context.

    Returns:
        ``{"input_ids": [B, T], "attention_mask": [B, T], "labels": [B, T]}``, labels -100 on padding
        and context.
    """
    if len(sequences) == 0 or any(len(sequence) == 0 for sequence in sequences):
        raise ValueError("sequences must be a non-empty list of non-empty token lists")
    if context_lengths is not None and len(context_lengths) != len(sequences):
        raise ValueError(f"context_lengths must have one entry per sequence ({len(sequences)})")
    input_ids, attention_mask = pad_rows(sequences, pad_token_id=pad_token_id)  # [B, T] each, on the host
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if context_lengths is not None:
        positions = torch.arange(input_ids.shape[1], device="cpu").unsqueeze(0)  # [1, T]
        labels = labels.masked_fill(positions < torch.as_tensor(list(context_lengths), device="cpu").unsqueeze(1), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _is_encoder_decoder(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _predicted_tokens(labels: torch.Tensor, *, encoder_decoder: bool) -> int:
    """How many labels the model's mean loss averages over (causal LMs shift labels by one)."""
    predicted = labels if encoder_decoder else labels[:, 1:]
    return int((predicted != -100).sum())


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean NLL of the labelled tokens of ``batch``, as the model's forward computes it."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def _loss(model: torch.nn.Module, batch: Batch, device: torch.device, loss_fn: LossFunction | None,
          autocast_dtype: torch.dtype | None) -> torch.Tensor:
    on_device = {name: batch[name].to(device) for name in ("input_ids", "attention_mask", "labels")}
    with autocast(device.type, autocast_dtype):
        return (loss_fn or model_loss)(model, on_device)


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    *,
    progress: bool = False,
    loss_fn: LossFunction | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """``exp(mean NLL)`` over every labelled token of ``batches``, in eval mode (restores train mode).

    ``loss_fn`` and ``autocast_dtype`` as in :func:`train_lm`. Under ``torchrun`` every process scores every
    ``size``-th batch and the sums are added up, so each returns the perplexity of all ``batches``.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    encoder_decoder = _is_encoder_decoder(model)
    ranks = current_ranks()
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(batches[ranks.rank :: ranks.size], desc="valid", disable=not progress, leave=False):
        count = _predicted_tokens(batch["labels"], encoder_decoder=encoder_decoder)
        if count == 0:
            continue
        total_nll += float(_loss(model, batch, device, loss_fn, autocast_dtype)) * count
        total_tokens += count
    model.train(was_training)
    total_nll, tokens = all_sum([total_nll, total_tokens], ranks, device=backend_device(device))
    total_tokens = round(tokens)
    if total_tokens == 0:
        raise ValueError("batches hold no labelled token to evaluate")
    return perplexity(total_nll, total_tokens)


class _BatchLoss(torch.nn.Module):
    """``batch -> mean NLL`` as a module, so that DistributedDataParallel can wrap any loss function."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFunction | None) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn or model_loss

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class _Replicas:
    """MLE across the processes of a ``torchrun`` group: every batch's rows split into one contiguous block
    per process, gradients averaged by DistributedDataParallel, and each process's loss weighted by its
    share of the batch's labelled tokens - so the update is the one a single process makes on the whole
    batch (up to float rounding and dropout's random masks)."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFunction | None, ranks: Ranks, device: torch.device,
                 encoder_decoder: bool) -> None:  # fmt: skip
        from torch.nn.parallel import DistributedDataParallel

        self.ranks, self.device, self.encoder_decoder = ranks, device, encoder_decoder
        self.wrapped = DistributedDataParallel(
            _BatchLoss(model, loss_fn), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
        )  # fmt: skip

    def share(self, batch: Batch) -> tuple[Batch, list[float]]:
        """This process's rows of ``batch``, and every process's count of labelled tokens."""
        first, stop = row_range(batch["input_ids"].shape[0], self.ranks)
        part = {name: batch[name][first:stop] for name in ("input_ids", "attention_mask", "labels")}
        count = _predicted_tokens(part["labels"], encoder_decoder=self.encoder_decoder)
        return part, counts_of_all(count, self.ranks, device=backend_device(self.device))

    def loss(self, part: Batch, counts: list[float], autocast_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to back-propagate, this process's mean NLL)."""
        on_device = {name: value.to(self.device) for name, value in part.items()}
        with autocast(self.device.type, autocast_dtype):
            mean = self.wrapped(on_device)
        return mean * weight_of_counts(counts, self.ranks), mean  # DDP averages gradients over the processes


def _epoch_metrics(
    on_epoch_end: Callable[[torch.nn.Module, int], Mapping[str, float]], model: torch.nn.Module, epoch: int
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        return {name: float(value) for name, value in on_epoch_end(model, epoch).items()}
    finally:
        model.train(was_training)


def _check_options(epochs: int, lr: float, clip: float | None, patience: int, lr_decay: float) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if clip is not None and not clip > 0.0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if not 0.0 < lr_decay <= 1.0:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")


@dataclass
class _Progress(LoopPosition):
    """Everything a resume needs besides weights and optimizer: the checkpoint's training state (``epoch``:
    epochs finished; the run resumes at an epoch boundary)."""

    history: TrainingHistory = field(default_factory=TrainingHistory)
    bad_epochs: int = 0
    learning_rate: float = 0.0
    finished: bool = False


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: _Progress) -> None:
    history = state.history
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "bad_epochs": state.bad_epochs,
        "learning_rate": state.learning_rate,
        "finished": state.finished,
        "history": {
            "epochs": [asdict(record) for record in history.epochs],
            "best_epoch": history.best_epoch,
            "best_valid_perplexity": history.best_valid_perplexity,
            "stopped_early": history.stopped_early,
        },
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    atomic_save(payload, path)


def _load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> _Progress:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    saved = payload["history"]
    history = TrainingHistory(
        epochs=[EpochRecord(**record) for record in saved["epochs"]],
        best_epoch=saved["best_epoch"],
        best_valid_perplexity=saved["best_valid_perplexity"],
        stopped_early=saved["stopped_early"],
    )
    return _Progress(epoch=payload["epoch"], history=history, bad_epochs=payload["bad_epochs"],
                     learning_rate=payload["learning_rate"], finished=payload["finished"])


def train_lm(
    model: torch.nn.Module,
    train_batches: Sequence[Batch],
    valid_batches: Sequence[Batch],
    *,
    epochs: int,
    lr: float,
    clip: float | None = 1.0,
    patience: int = 3,
    lr_decay: float = 1.0,
    weight_decay: float = 0.0,
    checkpoint_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    loss_fn: LossFunction | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_epoch_end: Callable[[torch.nn.Module, int], Mapping[str, float]] | None = None,
) -> TrainingHistory:
    """Train ``model`` by MLE with AdamW, gradient-norm clipping, validation perplexity after every
    epoch and early stopping; leave the best weights in ``model``.

    Args:
        model: on the device to train on; see the module docstring for what it must return.
        train_batches: batches (see :func:`collate_lm_batch`), visited in a fresh seeded order each epoch.
        valid_batches: batches for the validation perplexity.
        epochs: the most epochs to run (counting those of a resumed run).
        lr: AdamW learning rate.
        clip: max global gradient norm (None: no clipping).
        patience: stop after this many epochs in a row without a better validation perplexity.
        lr_decay: multiply the learning rate by this after an epoch without improvement (1: never).
        weight_decay: AdamW weight decay.
        checkpoint_dir: if given, after each epoch ``last.pt`` (weights, optimizer, history, RNG) and,
            on improvement, ``best.pt`` (weights) are written atomically; a later call with the same
            directory resumes from ``last.pt``. Keep it outside the repository.
        seed: seeds the batch order of each epoch.
        progress: show tqdm bars.
        loss_fn: ``(model, batch) -> mean NLL`` of the labelled tokens, for training and validation;
            default :func:`model_loss` (the model's forward with ``labels``). A model may offer a cheaper
            function with the same value, e.g. :meth:`decoding.models.RecurrentLM.scored_loss`.
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype (``torch.bfloat16``
            on CPUs with bf16 units, or GPUs); None: full precision.
        on_epoch_end: ``(model, epoch) -> {name: value}``, called after each epoch's validation with the
            epoch's weights (in eval mode; train mode is restored); the values are kept in the epoch's
            :class:`EpochRecord` ``metrics`` and in the checkpoint, so a resumed run keeps them.

    Under ``torchrun`` (:mod:`training.distributed`, after :func:`~training.distributed.init_distributed`)
    every process calls ``train_lm`` with the same arguments: each batch's rows are split across the
    processes and DistributedDataParallel averages the gradients, weighted so that the update is the one a
    single process makes on the whole batch; validation batches are shared out; only rank 0 writes the
    checkpoint, which any number of processes can resume.

    Returns:
        :class:`TrainingHistory` of every epoch run so far (including resumed ones).
    """
    _check_options(epochs, lr, clip, patience, lr_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir).expanduser()
    state = _Progress(learning_rate=lr)
    ranks = current_ranks()
    if directory is not None:
        if ranks.main:
            directory.mkdir(parents=True, exist_ok=True)
        barrier(ranks)
        if (directory / LAST_CHECKPOINT).is_file():
            state = _load_checkpoint(directory / LAST_CHECKPOINT, model, optimizer)
    device, encoder_decoder = _model_device(model), _is_encoder_decoder(model)
    replicas = None
    if ranks.distributed:
        replicas = _Replicas(model, loss_fn, ranks, device, encoder_decoder)
        torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + ranks.rank)  # each process its own dropout masks
    epoch_nll = {"nll": 0.0, "tokens": 0}  # the running epoch's summed training NLL and its token count
    best: dict[str, dict[str, torch.Tensor]] = {}  # "weights": the best epoch's weights, once this call has one

    def epoch_items(epoch: int) -> list[int]:
        """Start an epoch: its learning rate, train mode, and a fresh seeded batch order (drawn on the host)."""
        for group in optimizer.param_groups:
            group["lr"] = state.learning_rate
        model.train()
        epoch_nll.update(nll=0.0, tokens=0)
        generator = torch.Generator().manual_seed(seed + epoch)
        return torch.randperm(len(train_batches), generator=generator, device="cpu").tolist()

    def update(index: int) -> dict[str, float] | None:
        batch = train_batches[index]
        if replicas is None:
            count = _predicted_tokens(batch["labels"], encoder_decoder=encoder_decoder)
            if count == 0:
                return None
            loss = mean = _loss(model, batch, device, loss_fn, autocast_dtype)
        else:
            part, counts = replicas.share(batch)
            if min(counts) == 0:  # a process without a labelled token: every process skips the batch
                return None
            count = counts[ranks.rank]
            loss, mean = replicas.loss(part, counts, autocast_dtype)
        gradient_step(loss, optimizer, parameters=model.parameters(), clip=clip, synchronise=replicas is None)
        epoch_nll["nll"] += float(mean.detach()) * count
        epoch_nll["tokens"] += count
        return {"loss": epoch_nll["nll"] / epoch_nll["tokens"]}

    def end_epoch() -> None:
        """Validate the epoch's weights, keep the best, decay the learning rate, checkpoint."""
        nll, tokens = all_sum([epoch_nll["nll"], epoch_nll["tokens"]], ranks, device=backend_device(device))
        train_loss = nll / max(tokens, 1)
        valid_perplexity = evaluate_perplexity(
            model, valid_batches, progress=progress, loss_fn=loss_fn, autocast_dtype=autocast_dtype
        )
        improved = valid_perplexity < state.history.best_valid_perplexity
        metrics = {} if on_epoch_end is None else _epoch_metrics(on_epoch_end, model, state.epoch)
        state.history.epochs.append(
            EpochRecord(state.epoch, train_loss, valid_perplexity, state.learning_rate, improved, metrics)
        )
        if improved:
            state.history.best_epoch, state.history.best_valid_perplexity = state.epoch, valid_perplexity
            state.bad_epochs = 0
            best["weights"] = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
            if directory is not None and ranks.main:
                atomic_save(best["weights"], directory / BEST_WEIGHTS)
        else:
            state.bad_epochs += 1
            state.learning_rate *= lr_decay
            if state.bad_epochs >= patience:
                state.history.stopped_early = state.finished = True
        if directory is not None and ranks.main:
            _save_checkpoint(directory / LAST_CHECKPOINT, model, optimizer, state)
        barrier(ranks)

    run_loop(state, epoch_items=epoch_items, update=update, end_epoch=end_epoch,
             stop=lambda: "finished" if state.finished or state.epoch >= epochs else None,
             progress=Progress(f"train_lm ({epochs} epochs at most)", enabled=progress,
                               postfix=lambda logs: {"epoch": state.epoch + 1, "loss": f"{logs['loss']:.3f}"}))
    best_weights = best.get("weights")
    if best_weights is None and directory is not None and (directory / BEST_WEIGHTS).is_file():
        best_weights = torch.load(directory / BEST_WEIGHTS, map_location="cpu", weights_only=True)
    if best_weights is not None:
        model.load_state_dict(best_weights)
    return state.history
