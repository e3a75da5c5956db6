"""Task costs: per-sequence numbers in ``[0, 1]`` (lower is better) that MGS, MRT and PG minimise.

A cost is any callable ``cost(decoded: Decoded) -> Tensor [N]``. The built-in ones are looked up by name
with :func:`get_cost`:

- ``"bleu"``: ``1 - sentence BLEU / 100`` (sacrebleu, ``effective_order=True``) on detokenised text.
- ``"nontermination"``: 1 for a row that did not emit eos within the length cap, else 0.
- ``"length_ratio"``: ``min(1, |hypothesis length / reference length - 1|)`` in tokens.
- ``"repetition"``: seq-rep-4 of the generated tokens, ``1 - |unique 4-grams| / |4-grams|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
from sacrebleu.metrics import BLEU

from .decode import Hypotheses

__all__ = ["Decoded", "Cost", "COSTS", "get_cost", "bleu_cost", "nontermination_cost",
           "length_ratio_cost", "repetition_cost", "seq_rep_n"]


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


@lru_cache(maxsize=1)
def _sentence_bleu_metric() -> BLEU:
    return BLEU(effective_order=True)


def bleu_cost(decoded: Decoded) -> torch.Tensor:
    """``[N]``: 1 - sentence BLEU / 100 of each detokenised hypothesis against its reference."""
    metric = _sentence_bleu_metric()
    scores = [metric.sentence_score(hyp, [ref]).score for hyp, ref in zip(decoded.texts, decoded.references)]
    return 1.0 - torch.tensor(scores, dtype=torch.float) / 100.0


def nontermination_cost(decoded: Decoded) -> torch.Tensor:
    """``[N]``: 1.0 where the hypothesis did not emit eos within the length cap."""
    return (~decoded.hypotheses.terminated).float()


def length_ratio_cost(decoded: Decoded) -> torch.Tensor:
    """``[N]``: ``min(1, |len / reference_len - 1|)`` in tokens."""
    ratio = decoded.hypotheses.lengths.float() / decoded.reference_lengths.float().clamp(min=1.0)
    return (ratio - 1.0).abs().clamp(max=1.0)


def seq_rep_n(tokens: Sequence[int], *, n: int = 4) -> float:
    """``1 - |unique n-grams| / |n-grams|`` of one token sequence (0 when it has no n-gram)."""
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def repetition_cost(decoded: Decoded) -> torch.Tensor:
    """``[N]``: seq-rep-4 of each hypothesis' generated tokens (eos excluded)."""
    hyps = decoded.hypotheses
    rows = [row[: int(length) - int(done)] for row, length, done
            in zip(hyps.tokens.tolist(), hyps.lengths, hyps.terminated)]
    return torch.tensor([seq_rep_n(row) for row in rows], dtype=torch.float)


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
