"""Translating a test set and scoring it: corpus BLEU (with sacrebleu's signature), chrF, length ratio,
non-termination rate.

BLEU is :func:`decoding.metrics.corpus_bleu` (sacrebleu's defaults), the one BLEU of the library; chrF is
sacrebleu's with its defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import torch
from sacrebleu.metrics import CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from tqdm.auto import tqdm

from decoding.metrics import corpus_bleu, corpus_bleu_signature, length_ratio

from .decode import GenerateFn, Hypotheses, decode
from .distributed import current_ranks, gather, shard
from .padding import pad_rows

__all__ = ["Translations", "translate", "TranslationScores", "score_translations", "bleu_length_ratio",
           "chrf_signature"]


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

    Under ``torchrun`` the batches (fixed by ``batch_size``, whatever the number of processes) are shared
    out round robin and every process returns all the translations, those of one process.
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
    ranks = current_ranks()
    mine = shard(range(0, len(order), batch_size), ranks)
    try:
        for start in tqdm(mine, disable=not progress or not ranks.main, desc="translate"):
            chunk = order[start: start + batch_size]
            encoded = tokenizer([sources[i] for i in chunk], add_special_tokens=False, truncation=True,
                                max_length=max_length - 1)["input_ids"]
            ids, mask = pad_rows([tokens + [tokenizer.eos_token_id] for tokens in encoded],
                                 pad_token_id=tokenizer.pad_token_id)  # [B, S] each
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
    if ranks.distributed:  # every process filled its own batches' rows: collect each row from its process
        rows = [index for start in mine for index in order[start: start + batch_size]]
        for part in gather([(i, texts[i], terminated[i], lengths[i]) for i in rows], ranks):
            for index, text, stopped, length in part:
                texts[index], terminated[index], lengths[index] = text, stopped, length
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


def bleu_length_ratio(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Hypothesis over reference length in BLEU's 13a tokens (the ratio BLEU's brevity penalty reads)."""
    tokenize = Tokenizer13a()
    return length_ratio([len(tokenize(text.rstrip()).split()) for text in hypotheses],
                        [len(tokenize(text.rstrip()).split()) for text in references])


@lru_cache(maxsize=1)
def chrf_signature() -> str:
    """sacrebleu's signature of the chrF :func:`score_translations` reports (one reference per sentence)."""
    metric = CHRF()
    metric.corpus_score(["a"], [["a"]])  # sacrebleu knows nrefs only after scoring
    return str(metric.get_signature())


def score_translations(translations: Translations, references: Sequence[str]) -> TranslationScores:
    """Corpus BLEU (:func:`decoding.metrics.corpus_bleu`) and sacrebleu's chrF on detokenised text; length
    ratio = hypothesis / reference length (:func:`bleu_length_ratio`); non-termination = share of rows
    without eos within the cap."""
    if len(translations.texts) != len(references):
        raise ValueError(f"{len(translations.texts)} translations but {len(references)} references")
    chrf = CHRF().corpus_score(translations.texts, [list(references)])
    return TranslationScores(
        bleu=corpus_bleu(translations.texts, references), chrf=float(chrf.score),
        length_ratio=bleu_length_ratio(translations.texts, references),
        nontermination=1.0 - sum(translations.terminated) / len(translations.terminated),
        bleu_signature=corpus_bleu_signature(), chrf_signature=chrf_signature(),
    )
