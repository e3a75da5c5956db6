"""Translating a test set and scoring it: corpus BLEU (with sacrebleu's signature), chrF, length ratio,
non-termination rate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from sacrebleu.metrics import BLEU, CHRF
from tqdm.auto import tqdm

from .decode import GenerateFn, Hypotheses, decode

__all__ = ["Translations", "translate", "TranslationScores", "score_translations"]


@dataclass(frozen=True)
class Translations:
    texts: list[str]
    terminated: list[bool]
    lengths: list[int]


def _row_caps(source_mask: torch.LongTensor, factor: float, slack: int, cap: int) -> list[int]:
    """Each row's length cap ``min(cap, ceil(factor * source tokens) + slack)`` (eos counted)."""
    return [max(1, min(cap, math.ceil(factor * int(n)) + slack)) for n in source_mask.sum(1).tolist()]


def translate(model: torch.nn.Module, tokenizer, sources: Sequence[str], *, num_beams: int = 1,
              batch_size: int = 64, max_length: int = 64, length_factor: float = 1.5, length_slack: int = 10,
              length_cap: int = 120, per_row_cap: bool = False, generate_fn: GenerateFn | None = None,
              progress: bool = False) -> Translations:
    """Greedy (``num_beams=1``) or beam-search translations of ``sources``, in order.

    The length cap of a batch is ``min(length_cap, ceil(length_factor * longest source) + length_slack)``
    generated tokens (source tokens counted with their eos); a row that reaches it without eos counts as
    non-terminated. With ``per_row_cap`` every row gets its own cap from its own source length (e.g.
    ``length_factor=3, length_slack=0``: "no eos within 3x the source length"): the batch still decodes to
    its longest row's cap, and a longer output is cut at the row's cap and counts as non-terminated. For
    greedy decoding that equals decoding each row alone with its cap; beam search ran to the batch's cap.
    """
    if len(sources) == 0:
        raise ValueError("sources: nothing to translate")
    if not length_factor > 0 or length_slack < 0 or length_cap < 1:
        raise ValueError(f"need length_factor > 0, length_slack >= 0 and length_cap >= 1, got {length_factor}, "
                         f"{length_slack}, {length_cap}")
    was_training = model.training
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    texts: list[str] = [""] * len(sources)
    terminated = [False] * len(sources)
    lengths = [0] * len(sources)
    try:
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="translate"):
            chunk = order[start: start + batch_size]
            encoded = tokenizer([sources[i] for i in chunk], add_special_tokens=False, truncation=True,
                                max_length=max_length - 1)["input_ids"]
            width = max(len(row) for row in encoded) + 1
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long, device="cpu")
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate(encoded):
                ids[row, : len(tokens) + 1] = torch.tensor(tokens + [tokenizer.eos_token_id], device="cpu")
                mask[row, : len(tokens) + 1] = 1
            caps = _row_caps(mask, length_factor, length_slack, length_cap)
            device = next(model.parameters()).device
            hyps = decode(model, ids.to(device), mask.to(device), max_new_tokens=max(caps),
                          strategy="beam" if num_beams > 1 else "greedy", num_beams=num_beams,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          generate_fn=generate_fn)
            if per_row_cap:
                hyps = _cut_to_row_caps(hyps, caps, tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(hyps.tokens.tolist(), skip_special_tokens=True)
            for row, index in enumerate(chunk):
                texts[index] = decoded[row].strip()
                terminated[index] = bool(hyps.terminated[row])
                lengths[index] = int(hyps.lengths[row])
    finally:
        model.train(was_training)
    return Translations(texts, terminated, lengths)


def _cut_to_row_caps(hyps: Hypotheses, caps: list[int], pad_token_id: int) -> Hypotheses:
    """Rows longer than their cap (``caps`` ``[N]``) are cut there and marked non-terminated."""
    caps_tensor = torch.tensor(caps, dtype=torch.long, device=hyps.lengths.device)  # [N]
    over = hyps.lengths > caps_tensor
    lengths = torch.where(over, caps_tensor, hyps.lengths)
    positions = torch.arange(hyps.tokens.shape[1], device=hyps.tokens.device)[None, :]
    tokens = hyps.tokens.masked_fill(positions >= lengths[:, None], pad_token_id)  # [N, L]
    return Hypotheses(tokens=tokens, lengths=lengths, terminated=hyps.terminated & ~over)


@dataclass(frozen=True)
class TranslationScores:
    bleu: float
    chrf: float
    length_ratio: float
    nontermination: float
    bleu_signature: str
    chrf_signature: str

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def score_translations(translations: Translations, references: Sequence[str]) -> TranslationScores:
    """sacrebleu corpus BLEU and chrF on detokenised text; length ratio = hypothesis / reference length
    (BLEU's 13a tokens); non-termination = share of rows without eos within the cap."""
    if len(translations.texts) != len(references):
        raise ValueError(f"{len(translations.texts)} translations but {len(references)} references")
    bleu_metric, chrf_metric = BLEU(), CHRF()
    bleu = bleu_metric.corpus_score(translations.texts, [list(references)])
    chrf = chrf_metric.corpus_score(translations.texts, [list(references)])
    return TranslationScores(
        bleu=float(bleu.score), chrf=float(chrf.score),
        length_ratio=float(bleu.sys_len / max(bleu.ref_len, 1)),
        nontermination=1.0 - sum(translations.terminated) / len(translations.terminated),
        bleu_signature=str(bleu_metric.get_signature()), chrf_signature=str(chrf_metric.get_signature()),
    )
