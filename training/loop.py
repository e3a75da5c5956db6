"""The training loop: one loop with hooks that every trainer of the library and its benchmarks runs.

:func:`run_loop` visits batches epoch after epoch, times every update (wall and process CPU time), shows a
progress bar and asks its hooks what to do: which batches an epoch visits (``epoch_items``), how to make one
update (``update``: the per-batch loss, its backward pass and the optimiser step), what follows an update
(``after_update``: validation, checkpoints, budgets) and an epoch (``end_epoch``), and when to stop
(``stop``). Where a run stands is a :class:`LoopPosition`, which the trainers keep in their checkpoints so
that a later call resumes exactly. :func:`autocast` and :func:`gradient_step` are the mixed-precision
context and the clipped optimiser step the trainers share.

The trainers built on it: :func:`train` here (MLE, MGS, MRT and PG over parallel text),
:func:`training.lm.train_lm` (MLE of language models, per-epoch validation perplexity),
:func:`training.self_terminating_finetune.finetune_self_terminating` and the benchmarks' SmolLM2 fine-tunes.

:func:`train` runs an update step (:mod:`training.steps`, :class:`training.mgs.MGSStep`) over shuffled
epochs until a budget is spent (updates, epochs or seconds of update time), validates every so often
(higher scores are better), keeps the best weights, stops early after ``patience`` validations without
improvement or when a ``stop_rule`` (e.g. :class:`training.plateau.PlateauRule`) says the validation
curve has plateaued, and writes an atomic checkpoint that a later call resumes from exactly: same batches,
same random streams, same optimiser and step state.

Under ``torchrun`` (:mod:`training.distributed`) every process runs :func:`train` with the same arguments
and takes its share of each batch's rows; steps that support it (``runs_distributed``: MLE, MGS, MRT, PG) make
the update a single process makes on the whole batch, every process validates, rank 0 writes the files,
and a checkpoint resumes under any number of processes. A batch with fewer rows than processes is skipped.

Files in ``checkpoint_dir``: ``state.pt`` (everything needed to resume) and ``best.pt`` (the best
weights so far, by validation score).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_save, load_checkpoint, model_signature
from .distributed import agreed_seconds, average_gradients, barrier, current_ranks, row_range
from .parallel_text import Batch, EncodedParallel, epoch_batches, make_batch

if TYPE_CHECKING:
    from .steps import UpdateStep

__all__ = ["LoopPosition", "Progress", "run_loop", "autocast", "gradient_step", "LoopConfig", "TrainResult",
           "train", "load_best"]

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
Logs = Mapping[str, float]
Validate = Callable[[torch.nn.Module], float]
StopRule = Callable[[list[dict[str, float]]], bool]


# ----------------------------------------------------------------------------------------- the loop
@dataclass
class LoopPosition:
    """Where a run of :func:`run_loop` stands.

    Attributes:
        updates: updates made so far.
        epoch: epochs finished.
        batch_index: batches of the current epoch visited (updated or skipped).
        train_seconds: wall time of the updates; train_cpu_seconds: their process CPU time (steadier on a
            shared machine). Batch preparation and the hooks are not counted. Under torchrun each update
            counts the slowest process's times, so every process reads the same clock.
    """

    updates: int = 0
    epoch: int = 0
    batch_index: int = 0
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0


@dataclass(frozen=True)
class Progress:
    """The progress bar of :func:`run_loop`: one step per update, or its CPU seconds with ``by_cpu_seconds``.

    ``postfix(logs)`` gives the numbers shown beside the bar after each update.
    """

    description: str
    total: float | None = None
    by_cpu_seconds: bool = False
    postfix: Callable[[Logs], Mapping[str, object]] = lambda logs: {}
    enabled: bool = True


def _never() -> str | None:
    return None


def run_loop(position: LoopPosition, *, epoch_items: Callable[[int], Sequence[Item]],
             update: Callable[[Prepared], Logs | None], prepare: Callable[[Item], Prepared] = lambda item: item,
             after_update: Callable[[Logs], str | None] = lambda logs: None,
             end_epoch: Callable[[], str | None] = _never, stop: Callable[[], str | None] = _never,
             progress: Progress | None = None) -> str:
    """Run updates until a hook gives a reason to stop; return that reason.

    Args:
        position: where to start (a fresh one, or one restored from a checkpoint); advanced in place.
        epoch_items: ``epoch -> items``, the batches (or batch indices) epoch ``epoch`` visits, in order;
            called when an epoch starts (a resumed epoch skips its first ``position.batch_index``).
        update: one optimiser update on a prepared item; returns its logs, or None for a batch skipped
            without an update. Timed.
        prepare: item -> what ``update`` takes (e.g. a padded batch on the device). Not timed.
        after_update: called after every update with its logs; a string stops the run with that reason.
        end_epoch: called after each epoch, once ``position.epoch`` counts it; a string stops the run.
        stop: asked before the first update and after every epoch; a string stops the run.
        progress: the bar to show (None: none).
    """
    spec, ranks = progress or Progress("", enabled=False), current_ranks()
    initial = position.train_cpu_seconds if spec.by_cpu_seconds else position.updates
    bar = tqdm(total=spec.total, initial=initial, desc=spec.description, disable=not spec.enabled,
               unit="cpu s" if spec.by_cpu_seconds else "it", dynamic_ncols=True)
    try:
        reason = stop()
        while reason is None:
            items = epoch_items(position.epoch)
            while position.batch_index < len(items):
                prepared = prepare(items[position.batch_index])
                started, started_cpu = time.perf_counter(), time.process_time()
                logs = update(prepared)
                elapsed, cpu = agreed_seconds([time.perf_counter() - started, time.process_time() - started_cpu],
                                              ranks)  # under torchrun the slowest process's: one clock for all
                position.train_seconds += elapsed
                position.train_cpu_seconds += cpu
                position.batch_index += 1
                if logs is None:
                    continue
                position.updates += 1
                bar.update(cpu if spec.by_cpu_seconds else 1)
                bar.set_postfix(spec.postfix(logs))
                reason = after_update(logs)
                if reason is not None:
                    return reason
            position.epoch += 1
            position.batch_index = 0
            reason = end_epoch() or stop()
        return reason
    finally:
        bar.close()


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device_type`` with ``dtype`` (e.g. ``torch.bfloat16``); nothing when None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def gradient_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, parameters: Iterable[torch.Tensor],
                  clip: float | None, synchronise: bool = True) -> float | None:
    """Zero the gradients, back-propagate ``loss``, clip the gradient norm of ``parameters`` to ``clip``
    (None: no clipping) and step ``optimizer``; returns the norm before clipping (None without clipping).

    Under ``torchrun`` the gradients are averaged over the processes before clipping (``synchronise=False``:
    they already are, e.g. by DistributedDataParallel): weight each process's loss with
    :func:`training.distributed.share_weight` for the mean over all processes' examples."""
    parameters = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if synchronise:
        average_gradients(parameters, current_ranks())
    norm = None if clip is None else float(torch.nn.utils.clip_grad_norm_(parameters, clip))
    optimizer.step()
    return norm


# ------------------------------------------------------------------------------ parallel text: train
@dataclass(frozen=True)
class LoopConfig:
    """Budget and bookkeeping of :func:`train` (at least one of the three budgets must be set).

    Attributes:
        batch_size: sentence pairs per update.
        max_updates / max_epochs / max_seconds: stop when any is reached; ``max_seconds`` counts update
            time only (validation and checkpointing excluded), so methods can get equal time.
        validate_every: validate every this many updates ...
        validate_every_seconds: ... or once this much update time has passed since the last validation.
        validate_at_start: score the starting weights first (time 0 of a learning curve).
        patience: stop after this many validations without improvement (None: never).
        checkpoint_every: write ``state.pt`` every this many updates (and after every validation).
        seed: batch order and the step's random generator.
        progress: show a tqdm bar.
        autocast_dtype: run each update step under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); None: full precision. Validation always runs in full precision.
        keep_step_logs: also keep every update's logs in ``TrainResult.step_logs`` (not only the means per
            validation interval in ``history``).
    """

    batch_size: int = 64
    max_updates: int | None = None
    max_epochs: int | None = None
    max_seconds: float | None = None
    validate_every: int | None = None
    validate_every_seconds: float | None = None
    validate_at_start: bool = False
    patience: int | None = None
    checkpoint_every: int = 200
    seed: int = 0
    progress: bool = True
    autocast_dtype: torch.dtype | None = None
    keep_step_logs: bool = False

    def __post_init__(self) -> None:
        if self.max_updates is None and self.max_epochs is None and self.max_seconds is None:
            raise ValueError("set at least one of max_updates, max_epochs, max_seconds")
        if self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(f"batch_size and checkpoint_every must be >= 1, got {self.batch_size}, "
                             f"{self.checkpoint_every}")
        if self.autocast_dtype is not None and self.autocast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got "
                             f"{self.autocast_dtype}")


@dataclass
class TrainResult(LoopPosition):
    """Where training ended (a :class:`LoopPosition`) and what it found. ``history`` has one dict per
    validation (update, epoch, train_seconds, train_cpu_seconds, score, and the mean step logs since the
    previous validation). ``step_logs`` has one dict per update (``update`` and the step's logs) when
    ``keep_step_logs``."""

    best_score: float | None = None
    best_update: int | None = None
    bad_validations: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str | None = None
    step_logs: list[dict[str, float]] = field(default_factory=list)


def _save_state(path: Path, model, optimizer, scheduler, step, generator, result: TrainResult) -> None:
    atomic_save({
        "signature": model_signature(model),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.random.get_rng_state(),
        "result": result.__dict__,
    }, path)


def _restore_state(path: Path, model, optimizer, scheduler, step, generator) -> TrainResult:
    state = load_checkpoint(path, model)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    step.load_state_dict(state["step"])
    generator.set_state(state["generator"])
    torch.random.set_rng_state(state["torch_rng"])
    return TrainResult(**state["result"])


def load_best(model: torch.nn.Module, checkpoint_dir: str | Path) -> bool:
    """Load ``best.pt`` into ``model`` if there is one; return whether it was loaded."""
    path = Path(checkpoint_dir) / "best.pt"
    if not path.is_file():
        return False
    model.load_state_dict(load_checkpoint(path, model)["model"])
    return True


def _budget_spent(config: LoopConfig, result: TrainResult) -> str | None:
    if config.max_updates is not None and result.updates >= config.max_updates:
        return "max_updates"
    if config.max_epochs is not None and result.epoch >= config.max_epochs:
        return "max_epochs"
    if config.max_seconds is not None and result.train_seconds >= config.max_seconds:
        return "max_seconds"
    return None


class _Validator:
    def __init__(self, model, validate: Validate | None, config: LoopConfig, checkpoint_dir: Path | None):
        self.model, self.validate, self.config, self.dir = model, validate, config, checkpoint_dir
        self.logs: list[dict[str, float]] = []
        self.last_seconds = 0.0

    def due(self, result: TrainResult) -> bool:
        if self.validate is None:
            return False
        every, seconds = self.config.validate_every, self.config.validate_every_seconds
        return bool((every and result.updates % every == 0)
                    or (seconds and result.train_seconds - self.last_seconds >= seconds))

    def run(self, result: TrainResult, *, known_score: float | None = None) -> None:
        """Validate (or take ``known_score``, the score of the current weights measured elsewhere)."""
        score = float(self.validate(self.model)) if known_score is None else float(known_score)
        self.last_seconds = result.train_seconds
        keys = sorted({k for logs in self.logs for k in logs})
        means = {k: sum(l[k] for l in self.logs if k in l) / sum(k in l for l in self.logs) for k in keys}
        self.logs = []
        result.history.append({"update": result.updates, "epoch": result.epoch,
                               "train_seconds": result.train_seconds,
                               "train_cpu_seconds": result.train_cpu_seconds, "score": score, **means})
        if result.best_score is None or score > result.best_score:
            result.best_score, result.best_update, result.bad_validations = score, result.updates, 0
            if self.dir is not None and current_ranks().main:
                atomic_save({"signature": model_signature(self.model), "model": self.model.state_dict(),
                             "update": result.updates, "score": score}, self.dir / "best.pt")
        else:
            result.bad_validations += 1


def train(model: torch.nn.Module, step: UpdateStep, data: EncodedParallel, optimizer: torch.optim.Optimizer,
          *, config: LoopConfig, scheduler: Any | None = None, validate: Validate | None = None,
          checkpoint_dir: str | Path | None = None, stop_rule: StopRule | None = None,
          start_score: float | None = None) -> TrainResult:
    """Train ``model`` with ``step`` on ``data`` until a budget in ``config`` is spent.

    ``stop_rule(history)`` is asked after every validation; True stops the run (reason ``"plateau"``).
    ``start_score``: the validation score of the starting weights when the caller already knows it (e.g.
    the base model every fine-tuning run starts from); with ``validate_at_start`` it is recorded instead
    of validating again.

    If ``checkpoint_dir/state.pt`` exists the run resumes from it (its architecture is checked first);
    a run that already finished returns its stored result at once. After a run stopped by patience the
    caller usually loads the best weights with :func:`load_best`.
    """
    if start_score is not None and (validate is None or not config.validate_at_start):
        raise ValueError("start_score is the first point of the validation curve: it needs validate and "
                         "config.validate_at_start=True")
    ranks = current_ranks()
    if ranks.distributed and not getattr(step, "runs_distributed", False):
        raise ValueError(f"step: {type(step).__name__} does not run under torchrun (MLEStep, MGSStep, MRTStep and "
                         "PGStep do); run it in one process")
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state_path = directory / "state.pt" if directory is not None else None
    generator = torch.Generator(next(model.parameters()).device).manual_seed(config.seed)
    result = TrainResult()
    if state_path is not None and state_path.is_file():
        result = _restore_state(state_path, model, optimizer, scheduler, step, generator)
    if result.stop_reason is not None:
        return result
    validator = _Validator(model, validate, config, directory)
    validator.last_seconds = result.train_seconds

    def save() -> None:
        if ranks.main:  # every process holds the same state; one writes it
            _save_state(state_path, model, optimizer, scheduler, step, generator, result)
        barrier(ranks)

    save = None if state_path is None else save
    if config.validate_at_start and validate is not None and result.updates == 0 and not result.history:
        validator.run(result, known_score=start_score)
    result.stop_reason = _run_epochs(model, step, data, optimizer, scheduler, config, generator, result,
                                     validator, save, stop_rule)
    if validate is not None and (not result.history or result.history[-1]["update"] != result.updates):
        validator.run(result)
    if save is not None:
        save()
    return result


def _run_epochs(model, step, data, optimizer, scheduler, config: LoopConfig, generator, result: TrainResult,
                validator: _Validator, save: Callable[[], None] | None, stop_rule: StopRule | None) -> str:
    """:func:`run_loop` over ``data``'s shuffled epochs with ``step``; returns why it stopped."""
    device = next(model.parameters()).device
    ranks = current_ranks()

    def prepare(indices: list[int]) -> Batch | None:
        """The batch, or under torchrun this process's share of its rows (None: fewer rows than processes,
        a batch every process skips)."""
        batch = make_batch(data, indices)
        if ranks.distributed:
            if len(batch) < ranks.size:
                return None
            batch = batch.rows(*row_range(len(batch), ranks))
        return batch.to(device)

    def update(batch: Batch | None) -> dict[str, float] | None:
        if batch is None:
            return None
        with autocast(device.type, config.autocast_dtype):
            logs = step(model, batch, optimizer, generator=generator)
        if scheduler is not None:
            scheduler.step()
        return logs

    def after_update(logs: dict[str, float]) -> str | None:
        validator.logs.append(logs)
        if config.keep_step_logs:
            result.step_logs.append({"update": result.updates, **logs})
        validated = validator.due(result)
        if validated:
            validator.run(result)
            if config.patience is not None and result.bad_validations >= config.patience:
                return "patience"
            if stop_rule is not None and stop_rule(result.history):
                return "plateau"
        if save is not None and (validated or result.updates % config.checkpoint_every == 0):
            save()
        return _budget_spent(config, result)

    return run_loop(
        result, epoch_items=lambda epoch: epoch_batches(data, batch_size=config.batch_size, epoch=epoch,
                                                         seed=config.seed),
        prepare=prepare, update=update, after_update=after_update,
        stop=lambda: _budget_spent(config, result),
        progress=Progress(type(step).__name__, total=config.max_updates, enabled=config.progress,
                          postfix=lambda logs: {k: f"{v:.3g}" for k, v in list(logs.items())[:3]}),
    )  # fmt: skip
