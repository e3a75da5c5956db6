"""A sequence task for decoder-only LMs continuing prompts: MLE on any batch, costs from greedy decodes.

:class:`PromptTask` is what :class:`training.mgs.MGSStep` needs to fine-tune a language model against a
sequence-level cost such as non-termination: its batches pair whatever the MLE loss reads (``mle``) with
prompts of one length and their reference continuation lengths (``prompts``), so the MLE gradient and the
decoded cost may come from different lines (long lines for the likelihood, short ones whose decodes are
cheap to cap). Costs are token-level (:data:`TOKEN_COSTS`); several are averaged with :func:`mean_cost`.

Under ``torchrun`` each process decodes its share of the prompts (:meth:`PromptTaskBatch.rows`, capped as the
whole batch is: greedy rows decode alike in any batch) and weights its loss by ``weight`` (what ``loss``
averages over in its share), so :class:`~training.mgs.MGSStep` makes the one-process update.

Example::

    task = PromptTask(loss=lambda model, batch: model(**batch).loss, eos_token_id=eos, pad_token_id=eos,
                      cost=mean_cost(("nontermination", "repetition")), max_length_factor=1.5)
    step = MGSStep(task, MGSConfig(num_candidates=4))
    step(model, PromptTaskBatch(mle=train_batch, prompts=Prompts(prompt_ids, reference_lengths)), optimizer)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .costs import Cost, Decoded, get_cost
from .decode import decode

__all__ = ["TOKEN_COSTS", "Prompts", "PromptTaskBatch", "PromptTask", "mean_cost"]

TOKEN_COSTS = ("nontermination", "repetition", "length_ratio")


def mean_cost(names: Sequence[str]) -> Cost:
    """The mean of the token-level costs ``names`` (each in [0, 1], so the mean is too)."""
    if not names or any(name not in TOKEN_COSTS for name in names):
        raise ValueError(f"names must be a non-empty list of token-level costs {TOKEN_COSTS}, got {list(names)}")
    costs = [get_cost(name) for name in names]

    def cost(decoded: Decoded) -> torch.Tensor:
        return torch.stack([each(decoded) for each in costs]).mean(dim=0)

    cost.__name__ = "+".join(names)
    return cost


@dataclass(frozen=True)
class Prompts:
    """``B`` prompts of one length, ``input_ids [B, P]`` (no padding), and ``reference_lengths [B]``, the
    tokens of their reference continuations (eos included). ``whole_longest_reference``: on a share of a
    batch (:meth:`rows`), the longest reference of the whole batch; None on a whole batch."""

    input_ids: torch.LongTensor
    reference_lengths: torch.LongTensor
    whole_longest_reference: int | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.reference_lengths.shape != self.input_ids.shape[:1]:
            raise ValueError(f"input_ids must be [B, P] and reference_lengths [B], got "
                             f"{tuple(self.input_ids.shape)} and {tuple(self.reference_lengths.shape)}")
        if bool((self.reference_lengths < 1).any()):
            raise ValueError("reference_lengths must be >= 1 (eos included)")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def longest_reference(self) -> int:
        """Tokens of the longest reference of the whole batch these prompts are or are part of."""
        if self.whole_longest_reference is not None:
            return self.whole_longest_reference
        return int(self.reference_lengths.max())

    def rows(self, first: int, stop: int) -> Prompts:
        """Prompts ``first .. stop - 1`` (one process's share under torchrun), keeping the whole batch's
        longest reference."""
        if not 0 <= first < stop <= len(self):
            raise ValueError(f"rows({first}, {stop}): need 0 <= first < stop <= {len(self)} (a share needs a prompt)")
        return Prompts(self.input_ids[first:stop], self.reference_lengths[first:stop], self.longest_reference)


@dataclass(frozen=True)
class PromptTaskBatch:
    """What :class:`PromptTask` trains on: ``mle`` for the loss, ``prompts`` for the decoded cost."""

    mle: Any
    prompts: Prompts

    def rows(self, first: int, stop: int) -> PromptTaskBatch:
        """This batch with prompts ``first .. stop - 1`` (:meth:`Prompts.rows`); ``mle`` is passed on whole:
        ``loss`` and ``weight`` take a process's share of it themselves."""
        return PromptTaskBatch(self.mle, self.prompts.rows(first, stop))


@dataclass(frozen=True)
class PromptTask:
    """A :class:`training.task.SequenceTask` for a decoder-only LM.

    Attributes:
        loss: ``(model, batch.mle) -> scalar`` mean NLL, differentiable.
        eos_token_id, pad_token_id: of the model.
        cost: a token-level cost (:data:`TOKEN_COSTS` name, or e.g. :func:`mean_cost`); costs that read
            text (BLEU) are refused: this task decodes no text.
        max_length_factor: greedy decodes stop after ``ceil(factor * longest reference)`` new tokens; a row
            without eos by then counts as not terminated.
        weight: ``weight(batch.mle)``, what ``loss`` averages over (e.g. its scored tokens): under ``torchrun``
            each process's loss is weighted by its share of the total (None: the task runs in one process only).
    """

    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    eos_token_id: int
    pad_token_id: int
    cost: str | Cost = "nontermination"
    max_length_factor: float = 1.5
    weight: Callable[[Any], float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cost, str) and self.cost not in TOKEN_COSTS:
            raise ValueError(f"cost must be a token-level cost {TOKEN_COSTS} or a callable, got {self.cost!r}")
        if not self.max_length_factor > 0:
            raise ValueError(f"max_length_factor must be > 0, got {self.max_length_factor}")

    def max_new_tokens(self, prompts: Prompts) -> int:
        """The decode's length cap for ``prompts`` (of the whole batch, on a share)."""
        return max(1, math.ceil(self.max_length_factor * prompts.longest_reference))

    def decode(self, model: torch.nn.Module, prompts: Prompts) -> Decoded:
        """Greedy continuations of ``prompts``, moved to the model's device (in eval mode; the model's mode
        is restored)."""
        device = next(model.parameters()).device
        input_ids = prompts.input_ids.to(device)
        was_training = model.training
        model.eval()
        try:
            hypotheses = decode(model, input_ids, torch.ones_like(input_ids),
                                max_new_tokens=self.max_new_tokens(prompts), strategy="greedy",
                                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)  # fmt: skip
        finally:
            model.train(was_training)
        rows = prompts.input_ids.shape[0]
        return Decoded(hypotheses, texts=[""] * rows, references=[""] * rows,
                       reference_lengths=prompts.reference_lengths.to(device))  # fmt: skip

    def mle_loss(self, model: torch.nn.Module, batch: PromptTaskBatch) -> torch.Tensor:
        """``loss`` on ``batch.mle``."""
        return self.loss(model, batch.mle)

    def loss_weight(self, batch: PromptTaskBatch) -> float:
        """``weight`` of ``batch.mle``: what :meth:`mle_loss` averages over (asked under ``torchrun`` only)."""
        if self.weight is None:
            raise TypeError("under torchrun PromptTask needs weight=: what loss averages over in batch.mle "
                            "(e.g. its scored tokens)")
        return float(self.weight(batch.mle))

    def decode_costs(self, model: torch.nn.Module, batch: PromptTaskBatch, *, generator: torch.Generator | None
                     ) -> torch.Tensor:
        """``[B]`` costs of the greedy continuations of ``batch.prompts`` (``generator`` unused: greedy)."""
        del generator
        return get_cost(self.cost)(self.decode(model, batch.prompts)).float()
