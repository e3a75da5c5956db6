"""A sequence task: how a model is trained by MLE on a batch, and how its decoded output is scored.

:class:`SequenceTask` is what the update steps (:mod:`training.steps`, :mod:`training.mgs`) talk to.
:class:`Seq2SeqTask` implements it for transformers models (encoder-decoder, or decoder-only with
left-padded prompts) with :func:`training.decode.decode` and a cost from :mod:`training.costs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .costs import Cost, Decoded, get_cost
from .parallel_text import Batch
from .decode import GenerateFn, decode
from .losses import length_normalised, mle_loss, teacher_forced_logprobs

__all__ = ["SequenceTask", "Seq2SeqTask"]


class SequenceTask(Protocol):
    """The two things the training algorithms need from a task."""

    def mle_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar MLE loss of ``batch`` under ``model`` (differentiable)."""
        ...

    def decode_costs(self, model: torch.nn.Module, batch: Batch, *, generator: torch.Generator | None
                     ) -> torch.Tensor:
        """``[B]`` per-sequence costs of ``model``'s decoded output for ``batch`` (no gradient)."""
        ...


@dataclass(frozen=True)
class Seq2SeqTask:
    """Translation-style task over :class:`training.parallel_text.Batch` objects.

    Attributes:
        tokenizer: turns hypotheses back into detokenised text for the cost.
        cost: a cost name (see :data:`training.costs.COSTS`) or callable.
        strategy: decoder for :meth:`decode_costs`: ``"greedy"`` or ``"sample"``.
        max_length_factor: length cap = ``ceil(factor * longest reference in the batch)`` tokens.
        label_smoothing: for :meth:`mle_loss`.
        generate_fn: decoder override (default :func:`decoding.generate`).
    """

    tokenizer: object
    cost: str | Cost = "bleu"
    strategy: Literal["greedy", "sample"] = "greedy"
    max_length_factor: float = 1.3
    label_smoothing: float = 0.0
    generate_fn: GenerateFn | None = None

    def __post_init__(self) -> None:
        get_cost(self.cost)  # unknown names fail here, early
        if self.strategy not in ("greedy", "sample"):
            raise ValueError(f"strategy must be 'greedy' or 'sample', got {self.strategy!r}")
        if not self.max_length_factor > 0:
            raise ValueError(f"max_length_factor must be > 0, got {self.max_length_factor}")

    def mle_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return mle_loss(model, batch.source_ids, batch.source_mask, batch.target_ids, batch.target_mask,
                        label_smoothing=self.label_smoothing)

    def loss_weight(self, batch: Batch) -> int:
        """What :meth:`mle_loss` averages over: the target tokens (eos included)."""
        return int(batch.target_mask.sum())

    def max_new_tokens(self, batch: Batch) -> int:
        return max(1, math.ceil(self.max_length_factor * batch.longest_target))

    def decode(self, model: torch.nn.Module, batch: Batch, *, strategy: str, num_return_sequences: int = 1,
               generator: torch.Generator | None = None) -> Decoded:
        """Decode ``batch`` (``N = B * num_return_sequences`` rows, grouped by source)."""
        hyps = decode(model, batch.source_ids, batch.source_mask, max_new_tokens=self.max_new_tokens(batch),
                      strategy=strategy, num_return_sequences=num_return_sequences,
                      eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                      generator=generator, generate_fn=self.generate_fn,
                      prompt_share=batch.share if strategy == "sample" else None)
        texts = self.tokenizer.batch_decode(hyps.tokens.tolist(), skip_special_tokens=True)
        repeat = num_return_sequences
        references = [ref for ref in batch.references for _ in range(repeat)]
        reference_lengths = batch.target_mask.sum(1).repeat_interleave(repeat)
        return Decoded(hyps, texts, references, reference_lengths)

    def decode_costs(self, model: torch.nn.Module, batch: Batch, *, generator: torch.Generator | None
                     ) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            decoded = self.decode(model, batch, strategy=self.strategy, generator=generator)
        finally:
            model.train(was_training)
        return get_cost(self.cost)(decoded)

    def sample(self, model: torch.nn.Module, batch: Batch, *, num_samples: int,
               generator: torch.Generator | None) -> tuple[Decoded, torch.Tensor]:
        """``num_samples`` ancestral samples per source (eval mode) and their costs ``[B * K]``."""
        was_training = model.training
        model.eval()
        try:
            decoded = self.decode(model, batch, strategy="sample", num_return_sequences=num_samples,
                                  generator=generator)
        finally:
            model.train(was_training)
        return decoded, get_cost(self.cost)(decoded)

    def hypothesis_scores(self, model: torch.nn.Module, batch: Batch, decoded: Decoded, *, num_samples: int
                          ) -> torch.Tensor:
        """``[B, K]`` length-normalised log-probabilities of the decoded samples (differentiable)."""
        hyps = decoded.hypotheses
        source_ids = batch.source_ids.repeat_interleave(num_samples, dim=0)
        source_mask = batch.source_mask.repeat_interleave(num_samples, dim=0)
        mask = hyps.mask
        logprobs = teacher_forced_logprobs(model, source_ids, source_mask, hyps.tokens, mask)
        return length_normalised(logprobs, mask).view(len(batch), num_samples)
