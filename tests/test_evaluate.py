"""training.evaluate's scores: BLEU is decoding.metrics'; the length ratio is BLEU's own."""

from __future__ import annotations

import random

from sacrebleu.metrics import BLEU, CHRF

from decoding.metrics import corpus_bleu, corpus_bleu_signature
from training.evaluate import Translations, bleu_length_ratio, chrf_signature, score_translations

WORDS = ["a", "dog", "runs", ",", "the", "cat's", "(x)", "3.5", "end.", "don't", "-"]


def _sentence(rng: random.Random, least: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(least, 12))) + rng.choice(["", " ", "\t"])


def test_length_ratio_is_the_one_bleu_computes():
    rng = random.Random(0)
    for _ in range(100):
        count = rng.randint(1, 5)
        hypotheses = [_sentence(rng, 0) for _ in range(count)]
        references = [_sentence(rng, 1) for _ in range(count)]
        score = BLEU().corpus_score(hypotheses, [references])
        assert bleu_length_ratio(hypotheses, references) == score.sys_len / score.ref_len


def test_scores_use_the_library_bleu_and_sacrebleu_chrf():
    hypotheses, references = ["a dog runs .", "the cat sat"], ["a dog runs fast .", "the cat sat down"]
    scores = score_translations(Translations(hypotheses, [True, False], [5, 4]), references)
    assert scores.bleu == corpus_bleu(hypotheses, references)
    assert scores.chrf == CHRF().corpus_score(hypotheses, [references]).score
    assert scores.nontermination == 0.5
    assert scores.bleu_signature == corpus_bleu_signature() and "nrefs:1" in scores.bleu_signature
    assert scores.chrf_signature == chrf_signature() and "nrefs:1" in scores.chrf_signature
