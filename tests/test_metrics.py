"""Metrics on hand-made decodes: exact values, edge cases, errors."""

from __future__ import annotations

import functools
import math

import pytest
import sacrebleu
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoding.metrics import (
    continuation_tokens,
    corpus_bleu,
    corpus_bleu_signature,
    generated_lengths,
    length_ratio,
    mean_rep,
    mean_seq_rep_n,
    nontermination_ratio,
    perplexity,
    perplexity_from_log_probs,
    rep,
    sentence_bleu,
    seq_rep_n,
    truncated_share,
)

EOS, PAD = 2, 0

# Decoded with max_new_tokens=4, padded with PAD after eos.
DECODE = torch.tensor(
    [
        [5, 2, 0, 0],  # eos 2nd: terminated, length 2
        [5, 6, 7, 2],  # eos 4th = L-th: terminated, length 4
        [5, 5, 5, 5],  # no eos within L: not terminated, length 4
        [2, 0, 0, 0],  # eos first: terminated, length 1
    ]
)


# ---------------------------------------------------------------------------------------------------------
# termination and lengths


def test_nontermination_ratio_exact_on_tensor_and_lists():
    before = DECODE.clone()
    assert nontermination_ratio(DECODE, eos_token_id=EOS, max_new_tokens=4, pad_token_id=PAD) == 0.25
    assert nontermination_ratio(DECODE.tolist(), eos_token_id=EOS, max_new_tokens=4, pad_token_id=PAD) == 0.25
    assert torch.equal(DECODE, before)


def test_eos_as_last_allowed_token_is_terminated():
    assert nontermination_ratio([[5, 6, 7, 2]], eos_token_id=EOS, max_new_tokens=4) == 0.0
    assert nontermination_ratio([[5, 6, 7, 8]], eos_token_id=EOS, max_new_tokens=4) == 1.0


def test_rows_longer_than_L_count_eos_only_within_L():
    rows = [[5, 5, 5, 5, 2], [5, 2]]
    assert nontermination_ratio(rows, eos_token_id=EOS, max_new_tokens=4) == 0.5
    assert nontermination_ratio(rows, eos_token_id=EOS, max_new_tokens=5) == 0.0


def test_short_row_without_eos_raises_instead_of_miscounting():
    with pytest.raises(ValueError, match=r"sequences\[1\] has no eos and only 2 generated tokens"):
        nontermination_ratio([[5, 2], [5, 6]], eos_token_id=EOS, max_new_tokens=4)
    padded = torch.tensor([[5, 2, 0, 0], [5, 6, 0, 0]])  # row 1 is padding, not a decoded cap
    with pytest.raises(ValueError, match=r"sequences\[1\]"):
        nontermination_ratio(padded, eos_token_id=EOS, max_new_tokens=4, pad_token_id=PAD)


def test_pad_equal_to_eos_and_several_eos_ids():
    gpt2_style = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]])
    assert nontermination_ratio(gpt2_style, eos_token_id=EOS, max_new_tokens=4, pad_token_id=EOS) == 0.5
    assert generated_lengths(gpt2_style, eos_token_id=EOS, pad_token_id=EOS) == [2, 4]
    rows = [[5, 9], [5, 2], [5, 5]]
    assert nontermination_ratio(rows, eos_token_id=[2, 9], max_new_tokens=2) == pytest.approx(1 / 3)


def test_terminated_flags_are_cross_checked():
    r_4 = functools.partial(nontermination_ratio, DECODE, eos_token_id=EOS, max_new_tokens=4, pad_token_id=PAD)
    assert r_4(terminated=torch.tensor([True, True, False, True])) == 0.25
    with pytest.raises(ValueError, match=r"terminated\[2\]=True disagrees"):
        r_4(terminated=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="3 flags but sequences has 4 rows"):
        r_4(terminated=[1, 1, 0])


def test_lengths_and_continuations():
    assert generated_lengths(DECODE, eos_token_id=EOS, pad_token_id=PAD) == [2, 4, 4, 1]
    continuations = functools.partial(continuation_tokens, DECODE, eos_token_id=EOS, pad_token_id=PAD)
    assert continuations() == [[5], [5, 6, 7], [5, 5, 5, 5], []]
    assert continuations(keep_eos=True) == [[5, 2], [5, 6, 7, 2], [5, 5, 5, 5], [2]]
    # without a pad id, rows without eos are taken whole
    assert generated_lengths([[5, 0, 0]], eos_token_id=EOS) == [3]
    assert generated_lengths([[5, 0, 0]], eos_token_id=EOS, pad_token_id=PAD) == [1]


def test_truncated_share_with_per_row_caps():
    rows = [[5, 6, 2], [5, 6, 7], [5, 2, 0]]
    share = functools.partial(truncated_share, rows, eos_token_id=EOS, pad_token_id=PAD)
    assert share(max_new_tokens=[3, 3, 2]) == pytest.approx(1 / 3)
    assert share(max_new_tokens=[2, 3, 2]) == pytest.approx(2 / 3)  # row 0: eos is the 3rd token, cap 2
    with pytest.raises(ValueError, match="2 caps but sequences has 3 rows"):
        truncated_share(rows, eos_token_id=EOS, max_new_tokens=[3, 3])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        truncated_share(rows, eos_token_id=EOS, max_new_tokens=[3, 0, 3])


def test_length_ratio():
    assert length_ratio([2, 4], [3, 3]) == 1.0
    assert length_ratio([1, 1], [3, 1]) == 0.5  # ratio of means, not mean of ratios (which is 2/3)
    with pytest.raises(ValueError, match="2 entries but ref_lengths has 1"):
        length_ratio([1, 2], [3])
    with pytest.raises(ValueError, match="empty"):
        length_ratio([], [])
    with pytest.raises(ValueError, match="all 0"):
        length_ratio([1], [0])


@pytest.mark.parametrize(
    "sequences, options, error, match",
    [
        ([], {}, ValueError, "empty"),
        (torch.zeros(0, 4, dtype=torch.long), {}, ValueError, "empty"),
        (DECODE, {"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        (DECODE.float(), {}, TypeError, "integer token ids"),
        (DECODE[0], {}, ValueError, "2-D tensor"),
        (DECODE, {"eos_token_id": []}, ValueError, "eos_token_id"),
        ([[1.5, 2]], {}, TypeError, "int token ids"),
        ("abc", {}, TypeError, "sequences must be"),
    ],
)
def test_bad_input_is_rejected(sequences, options, error, match):
    with pytest.raises(error, match=match):
        nontermination_ratio(sequences, **{"eos_token_id": EOS, "max_new_tokens": 4, **options})


# ---------------------------------------------------------------------------------------------------------
# repetition


def test_seq_rep_n_by_hand():
    # 4-grams of 1 2 3 4 1 2 3 4: 1234 2341 3412 4123 1234 -> 5 n-grams, 4 unique
    assert seq_rep_n([1, 2, 3, 4, 1, 2, 3, 4], n=4) == pytest.approx(0.2)
    assert seq_rep_n(torch.tensor([1, 1, 2]), n=1) == pytest.approx(1 / 3)
    assert seq_rep_n([7, 7, 7, 7, 7], n=4) == pytest.approx(0.5)  # 2 n-grams, 1 unique
    assert seq_rep_n([1, 2, 3], n=4) == 0.0  # shorter than n: no n-gram, defined as 0
    assert seq_rep_n([], n=1) == 0.0
    assert mean_seq_rep_n([[1, 2, 3, 4, 1, 2, 3, 4], [1, 2, 3]], n=4) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        seq_rep_n([1, 2], n=0)
    with pytest.raises(ValueError, match="continuations is empty"):
        mean_seq_rep_n([], n=4)


def test_rep_by_hand():
    tokens = [1, 2, 1, 3, 2]  # t=2 repeats 1 (2 back), t=4 repeats 2 (3 back)
    assert rep(tokens, window=128) == pytest.approx(2 / 4)
    assert rep(tokens, window=3) == pytest.approx(2 / 4)
    assert rep(tokens, window=2) == pytest.approx(1 / 4)
    assert rep(tokens, window=1) == 0.0
    assert rep([4], window=128) == 0.0
    assert mean_rep([tokens, [4, 4]], window=128) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="window must be >= 1"):
        rep(tokens, window=0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(tokens=st.lists(st.integers(0, 5), max_size=40), window=st.integers(1, 8), n=st.integers(1, 5))
def test_repetition_matches_the_definitions(tokens, window, n):
    scored = range(1, len(tokens))
    naive_rep = sum(tokens[t] in tokens[max(0, t - window) : t] for t in scored) / max(len(scored), 1)
    assert rep(tokens, window=window) == pytest.approx(naive_rep)
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    naive_seq_rep = 1 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0
    assert seq_rep_n(tokens, n=n) == pytest.approx(naive_seq_rep)


# ---------------------------------------------------------------------------------------------------------
# perplexity


def test_perplexity():
    assert perplexity(3 * math.log(4.0), 3) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="n_tokens must be >= 1"):
        perplexity(1.0, 0)


def test_perplexity_from_log_probs_skips_masked_positions():
    log_probs = torch.log(torch.tensor([[0.9, 0.5, 0.25], [0.9, 0.125, 0.01]]))
    mask = torch.tensor([[False, True, True], [False, True, False]])  # context and padding left out
    expected = math.exp(-(math.log(0.5) + math.log(0.25) + math.log(0.125)) / 3)  # = 4
    assert perplexity_from_log_probs(log_probs, mask) == pytest.approx(expected)
    assert perplexity_from_log_probs(log_probs, mask.long()) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="differ in shape"):
        perplexity_from_log_probs(log_probs, mask[:, :2])
    with pytest.raises(ValueError, match="no tokens"):
        perplexity_from_log_probs(log_probs, torch.zeros_like(mask))


# ---------------------------------------------------------------------------------------------------------
# BLEU

HYPS = ["The cat sat on the mat.", "A man is riding a bike down the street.", "Two dogs play."]
REFS = ["The cat sat on a mat.", "A man rides a bicycle down the street.", "Two dogs play in the snow."]


def test_corpus_bleu_matches_sacrebleu():
    expected = sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert corpus_bleu(HYPS, REFS) == pytest.approx(expected)
    assert 0.0 < corpus_bleu(HYPS, REFS) < 100.0
    assert corpus_bleu(REFS, REFS) == pytest.approx(100.0)
    signature = corpus_bleu_signature()
    assert "tok:13a" in signature and "nrefs:1" in signature and "eff:no" in signature


def test_sentence_bleu_matches_sacrebleu_with_effective_order():
    for hyp, ref in zip(HYPS, REFS):
        expected = sacrebleu.sentence_bleu(hyp, [ref], use_effective_order=True).score
        assert sentence_bleu(hyp, ref) == pytest.approx(expected)
    # effective order: a 2-word hypothesis with no 3/4-gram matches still scores above 0
    assert sentence_bleu("Two dogs", "Two dogs play.") > 0.0


def test_bleu_rejects_bad_input():
    with pytest.raises(ValueError, match="3 entries but references has 2"):
        corpus_bleu(HYPS, REFS[:2])
    with pytest.raises(ValueError, match="empty"):
        corpus_bleu([], [])
    with pytest.raises(TypeError, match="detokenised"):
        corpus_bleu([["The", "cat"]], ["The cat"])
    with pytest.raises(TypeError, match="detokenised"):
        sentence_bleu(["The"], "The cat")
