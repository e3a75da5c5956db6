"""Task costs: per-sequence numbers in ``[0, 1]`` (lower is better) that MGS, MRT and PG minimise.

A cost is any callable ``cost(decoded: Decoded) -> Tensor [N]``. The built-in ones are looked up by name
with :func:`get_cost`:

- ``"bleu"``: ``1 - sentence BLEU / 100`` (:func:`decoding.metrics.sentence_bleu`: sacrebleu,
  ``effective_order=True``) on detokenised text.
- ``"nontermination"``: 1 for a row that did not emit eos within the length cap, else 0.
- ``"length_ratio"``: ``min(1, |hypothesis length / reference length - 1|)`` in tokens.
- ``"repetition"``: seq-rep-4 of the generated tokens, ``1 - |unique 4-grams| / |4-grams|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from decoding.metrics import sentence_bleu, seq_rep_n

from .decode import Hypotheses

__all__ = ["Decoded", "Cost", "COSTS", "get_cost", "bleu_cost", "nontermination_cost",
           "length_ratio_cost", "repetition_cost"]


@dataclass(frozen=True)
class Decoded:
    """What a cost sees: ``N`` hypotheses and their references.

    Attributes:
        hypotheses: generated tokens, lengths and termination flags (``N`` rows).
        texts: the ``N`` detokenised hypotheses.
        references: the ``N`` raw reference strings.
        reference_lengths: ``[N]`` reference lengths in tokens (eos included).
    """

    hypotheses: Hypotheses
    texts: Sequence[str]
    references: Sequence[str]
    reference_lengths: torch.LongTensor


Cost = Callable[[Decoded], torch.Tensor]


def bleu_cost(decoded: Decoded) -> torch.Tensor:
    """``[N]``: 1 - sentence BLEU / 100 of each detokenised hypothesis against its reference."""
    scores = [sentence_bleu(hyp, ref) for hyp, ref in zip(decoded.texts, decoded.references)]
    return 1.0 - torch.tensor(scores, dtype=torch.float, device=decoded.hypotheses.tokens.device) / 100.0


def nontermination_cost(decoded: Decoded) -> torch.Tensor:
    """``[N]``: 1.0 where the hypothesis did not emit eos within the length cap."""
    return (~decoded.hypotheses.terminated).float()


def length_ratio_cost(decoded: Decoded) -> torch.Tensor:
    """``[N]``: ``min(1, |len / reference_len - 1|)`` in tokens."""
    ratio = decoded.hypotheses.lengths.float() / decoded.reference_lengths.float().clamp(min=1.0)
    return (ratio - 1.0).abs().clamp(max=1.0)


def repetition_cost(decoded: Decoded) -> torch.Tensor:
    """``[N]``: seq-rep-4 of each hypothesis' generated tokens (eos excluded)."""
    hyps = decoded.hypotheses
    rows = [row[: int(length) - int(done)] for row, length, done
            in zip(hyps.tokens.tolist(), hyps.lengths, hyps.terminated)]
    return torch.tensor([seq_rep_n(row, n=4) for row in rows], dtype=torch.float, device=hyps.tokens.device)


COSTS: dict[str, Cost] = {
    "bleu": bleu_cost,
    "nontermination": nontermination_cost,
    "length_ratio": length_ratio_cost,
    "repetition": repetition_cost,
}


def get_cost(cost: str | Cost) -> Cost:
    """The cost called ``cost`` (see :data:`COSTS`), or ``cost`` itself when it is callable."""
    if callable(cost):
        return cost
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; known costs: {', '.join(sorted(COSTS))}")
    return COSTS[cost]
