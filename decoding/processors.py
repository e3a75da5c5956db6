"""Consistent samplers as transformers ``LogitsProcessor`` objects, for users of ``model.generate``.

Each processor applies a truncation rule (top-k, nucleus, min-p, typical, epsilon, eta, or any mix of them)
and then puts eos back into the candidate set with its own score, so the sampled distribution is ``p``
renormalised over ``V_t ∪ {eos}`` and ``q(eos) >= p(eos)`` at every step: a model whose ``p(eos)`` is
bounded away from 0 then terminates with probability 1 (Welleck et al. 2020, "Consistency of a recurrent
language model with respect to incomplete decoding"). They are thin wrappers around
:func:`decoding.transforms.truncate` with ``consistent=True``.

Usage::

    from decoding.processors import ConsistentTopPLogitsWarper

    eos_token_id = model.generation_config.eos_token_id
    out = model.generate(
        input_ids,
        do_sample=True,
        top_k=0, top_p=1.0,            # switch transformers' own warpers off (see below)
        temperature=1.0,               # pass temperature to the processor instead (see below)
        logits_processor=[ConsistentTopPLogitsWarper(0.9, eos_token_id, temperature=0.8)],
        max_new_tokens=256,
    )

Two things to get right:

* **Switch the built-in warper of the same kind off.** transformers runs user processors *before* its
  own sampling warpers, so a built-in ``top_k`` / ``top_p`` / ``min_p`` / ``typical_p`` / ``epsilon_cutoff`` /
  ``eta_cutoff`` would truncate again and mask eos a second time. Pass ``top_k=0`` (generate's default is
  50!), ``top_p=1.0``, ``min_p=None``, ``typical_p=1.0``, ``epsilon_cutoff=0.0``, ``eta_cutoff=0.0``.
* **Temperature goes to the processor.** transformers' temperature warper also runs after user processors,
  i.e. after truncation, whereas the kept sets of top-p, min-p, typical, epsilon and eta depend on the
  temperature. Give the processor ``temperature=`` and leave generate's ``temperature`` at 1.0. (For top-k
  alone the order does not matter, but the processor's argument works there too.)

Greedy and beam search never sample, so these processors cannot make them consistent: use a
self-terminating output layer for that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from .transforms import Truncation, apply_temperature, as_token_ids, check_temperature, truncate

__all__ = [
    "ConsistentTruncationLogitsWarper",
    "ConsistentTopKLogitsWarper",
    "ConsistentTopPLogitsWarper",
    "ConsistentMinPLogitsWarper",
    "ConsistentTypicalLogitsWarper",
    "ConsistentEpsilonLogitsWarper",
    "ConsistentEtaLogitsWarper",
]


class ConsistentTruncationLogitsWarper(LogitsProcessor):
    """Temperature, then the rules of ``truncation``, then eos un-masked with its own score.

    Args:
        truncation: the truncation rules (transformers' meanings).
        eos_token_id: the eos id(s) kept in every candidate set.
        temperature: > 0, applied before truncation; leave generate's own ``temperature`` at 1.0.

    Called on ``(input_ids [B, T], scores [B, V])``, returns new ``[B, V]`` scores (``input_ids`` unused).
    """

    def __init__(
        self,
        truncation: Truncation,
        eos_token_id: int | Sequence[int] | torch.Tensor,
        *,
        temperature: float = 1.0,
    ) -> None:
        if not isinstance(truncation, Truncation):
            raise TypeError(f"`truncation` must be a Truncation, got {type(truncation).__name__}")
        self.truncation = truncation
        self.eos_token_id = as_token_ids(eos_token_id, name="eos_token_id")  # [E] on the CPU
        self.temperature = check_temperature(temperature)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.eos_token_id.device != scores.device:  # move once, not every step
            self.eos_token_id = self.eos_token_id.to(scores.device)
        if self.temperature != 1.0:
            scores = apply_temperature(scores, self.temperature)
        return truncate(scores, self.truncation, eos_token_ids=self.eos_token_id, consistent=True)

    def __repr__(self) -> str:
        eos = self.eos_token_id.tolist()
        return f"{type(self).__name__}({self.truncation}, eos_token_id={eos}, temperature={self.temperature})"


class ConsistentTopKLogitsWarper(ConsistentTruncationLogitsWarper):
    """Consistent top-k: ``topk(p, k) ∪ {eos}``. Pass ``top_k=0`` to generate."""

    def __init__(
        self,
        top_k: int,
        eos_token_id: int | Sequence[int] | torch.Tensor,
        *,
        min_tokens_to_keep: int = 1,
        temperature: float = 1.0,
    ) -> None:
        truncation = Truncation(top_k=top_k, min_tokens_to_keep=min_tokens_to_keep)
        super().__init__(truncation, eos_token_id, temperature=temperature)


class ConsistentTopPLogitsWarper(ConsistentTruncationLogitsWarper):
    """Consistent nucleus sampling: ``V_mu ∪ {eos}``. Pass ``top_p=1.0`` and ``top_k=0`` to generate."""

    def __init__(
        self,
        top_p: float,
        eos_token_id: int | Sequence[int] | torch.Tensor,
        *,
        min_tokens_to_keep: int = 1,
        temperature: float = 1.0,
    ) -> None:
        truncation = Truncation(top_p=top_p, min_tokens_to_keep=min_tokens_to_keep)
        super().__init__(truncation, eos_token_id, temperature=temperature)


class ConsistentMinPLogitsWarper(ConsistentTruncationLogitsWarper):
    """Consistent min-p sampling. Leave generate's ``min_p`` unset and pass ``top_k=0``."""

    def __init__(
        self,
        min_p: float,
        eos_token_id: int | Sequence[int] | torch.Tensor,
        *,
        min_tokens_to_keep: int = 1,
        temperature: float = 1.0,
    ) -> None:
        truncation = Truncation(min_p=min_p, min_tokens_to_keep=min_tokens_to_keep)
        super().__init__(truncation, eos_token_id, temperature=temperature)


class ConsistentTypicalLogitsWarper(ConsistentTruncationLogitsWarper):
    """Consistent locally typical sampling. Pass ``typical_p=1.0`` and ``top_k=0`` to generate."""

    def __init__(
        self,
        mass: float,
        eos_token_id: int | Sequence[int] | torch.Tensor,
        *,
        min_tokens_to_keep: int = 1,
        temperature: float = 1.0,
    ) -> None:
        truncation = Truncation(typical_p=mass, min_tokens_to_keep=min_tokens_to_keep)
        super().__init__(truncation, eos_token_id, temperature=temperature)


class ConsistentEpsilonLogitsWarper(ConsistentTruncationLogitsWarper):
    """Consistent epsilon sampling. Pass ``epsilon_cutoff=0.0`` and ``top_k=0`` to generate."""

    def __init__(
        self,
        epsilon: float,
        eos_token_id: int | Sequence[int] | torch.Tensor,
        *,
        min_tokens_to_keep: int = 1,
        temperature: float = 1.0,
    ) -> None:
        truncation = Truncation(epsilon_cutoff=epsilon, min_tokens_to_keep=min_tokens_to_keep)
        super().__init__(truncation, eos_token_id, temperature=temperature)


class ConsistentEtaLogitsWarper(ConsistentTruncationLogitsWarper):
    """Consistent eta sampling. Pass ``eta_cutoff=0.0`` and ``top_k=0`` to generate."""

    def __init__(
        self,
        epsilon: float,
        eos_token_id: int | Sequence[int] | torch.Tensor,
        *,
        min_tokens_to_keep: int = 1,
        temperature: float = 1.0,
    ) -> None:
        truncation = Truncation(eta_cutoff=epsilon, min_tokens_to_keep=min_tokens_to_keep)
        super().__init__(truncation, eos_token_id, temperature=temperature)
