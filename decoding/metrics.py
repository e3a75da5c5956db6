"""Metrics for decoded continuations: the non-termination ratio ``r_L = q(|y| > L)`` (the share of
continuations without eos within ``L`` generated tokens; Welleck et al. 2020, "Consistency of a recurrent
language model with respect to incomplete decoding"), lengths, repetition (``seq-rep-n``), perplexity and
BLEU.

Pure functions on token ids: nothing here modifies its input. Sequences are given either as a LongTensor
``[N, T]`` (the generated part of a ``generate`` call, padded after eos) or as a list of token-id lists;
a single continuation as a 1-D tensor or a list of ints. Pass only the *generated* tokens, never the prompt.

Example, three continuations decoded with ``max_new_tokens=4`` and eos id 2 (pad 0 after eos)::

    out = torch.tensor([[5, 2, 0, 0],    # eos as the 2nd token: terminated, length 2
                        [5, 6, 7, 2],    # eos as the 4th = L-th token: terminated, length 4
                        [5, 5, 5, 5]])   # no eos within L: not terminated
    nontermination_ratio(out, eos_token_id=2, max_new_tokens=4, pad_token_id=0)   # 1/3
    generated_lengths(out, eos_token_id=2, pad_token_id=0)                        # [2, 4, 4]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from sacrebleu.metrics import BLEU

__all__ = [
    "continuation_tokens",
    "generated_lengths",
    "nontermination_ratio",
    "truncated_share",
    "length_ratio",
    "seq_rep_n",
    "mean_seq_rep_n",
    "rep",
    "mean_rep",
    "perplexity",
    "perplexity_from_log_probs",
    "corpus_bleu",
    "corpus_bleu_signature",
    "sentence_bleu",
]

TokenRows = torch.Tensor | Sequence[Sequence[int]]
Tokens = torch.Tensor | Sequence[int]
EosIds = int | Sequence[int]


# ---------------------------------------------------------------------------------------------------------
# input checks


def _as_rows(sequences: TokenRows, *, name: str = "sequences") -> list[list[int]]:
    """Rows of ``sequences`` as lists of ints; ValueError when there are none."""
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [N, T], got shape {tuple(sequences.shape)}")
        if sequences.is_floating_point() or sequences.is_complex() or sequences.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {sequences.dtype}")
        rows = sequences.tolist()
    elif isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
        raise TypeError(
            f"{name} must be a LongTensor [N, T] or a list of token-id lists, got {type(sequences)}"
        )
    else:
        rows = [_as_tokens(row, name=f"{name}[{i}]") for i, row in enumerate(sequences)]
    if not rows:
        raise ValueError(f"{name} is empty: need at least one sequence")
    return rows


def _as_tokens(tokens: Tokens, *, name: str = "tokens") -> list[int]:
    """One continuation as a list of ints."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor of token ids, got shape {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
        return tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise TypeError(f"{name} must be a 1-D tensor or a list of token ids, got {type(tokens)}")
    out = list(tokens)
    for token in out:
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"{name} must contain int token ids, found {token!r}")
    return out


def _eos_set(eos_token_id: EosIds) -> frozenset[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        raise ValueError("eos_token_id must be an int or a non-empty list of ints")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return frozenset(ids)


def _positive_int(value: int, *, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _first_eos(row: list[int], eos: frozenset[int]) -> int | None:
    return next((i for i, token in enumerate(row) if token in eos), None)


def _strip_padding(row: list[int], pad_token_id: int | None) -> list[int]:
    end = len(row)
    if pad_token_id is not None:
        while end and row[end - 1] == pad_token_id:
            end -= 1
    return row[:end]


# ---------------------------------------------------------------------------------------------------------
# termination and lengths


def continuation_tokens(
    sequences: TokenRows, *, eos_token_id: EosIds, pad_token_id: int | None = None, keep_eos: bool = False
) -> list[list[int]]:
    """The generated tokens of each row: up to its first eos, or with trailing padding removed.

    Args:
        sequences: ``[N, T]`` generated tokens (no prompt), or a list of ``N`` token-id lists.
        eos_token_id: the eos id, or several (any of them ends a row).
        pad_token_id: id used to pad rows after they end; trailing copies are dropped from rows without
            eos. ``None``: rows without eos are taken whole.
        keep_eos: keep the eos token at the end of rows that have one.

    Returns:
        ``N`` lists of token ids. Use ``keep_eos=False`` for repetition metrics and detokenisation.
    """
    eos = _eos_set(eos_token_id)
    out = []
    for row in _as_rows(sequences):
        end = _first_eos(row, eos)
        out.append(_strip_padding(row, pad_token_id) if end is None else row[: end + 1 if keep_eos else end])
    return out


def generated_lengths(
    sequences: TokenRows, *, eos_token_id: EosIds, pad_token_id: int | None = None
) -> list[int]:
    """Number of generated tokens per row, eos included (see :func:`continuation_tokens`)."""
    rows = continuation_tokens(sequences, eos_token_id=eos_token_id, pad_token_id=pad_token_id, keep_eos=True)
    return [len(row) for row in rows]


def _terminated_within(
    rows: list[list[int]], eos: frozenset[int], caps: list[int], pad_token_id: int | None
) -> list[bool]:
    """Per row: did eos appear among the first ``cap`` tokens. Raises on rows too short to tell."""
    flags = []
    for index, (row, cap) in enumerate(zip(rows, caps)):
        end = _first_eos(row, eos)
        if end is None:
            length = len(_strip_padding(row, pad_token_id))
            if length < cap:
                raise ValueError(
                    f"sequences[{index}] has no eos and only {length} generated tokens, fewer than "
                    f"max_new_tokens={cap}: it stopped for a reason other than the length cap, so whether "
                    "it terminates within the cap is unknown. Decode up to max_new_tokens, pass only the "
                    "generated part, and check eos_token_id / pad_token_id."
                )
        flags.append(end is not None and end < cap)
    return flags


def nontermination_ratio(
    sequences: TokenRows,
    *,
    eos_token_id: EosIds,
    max_new_tokens: int,
    pad_token_id: int | None = None,
    terminated: torch.Tensor | Sequence[bool] | None = None,
) -> float:
    """``r_L``: the share of continuations without eos among their first ``L = max_new_tokens`` tokens.

    A row whose L-th token is eos is terminated. A row longer than L counts as non-terminated unless eos
    is among its first L tokens, so ``r_L`` for several L can come from one decode with the largest L.
    A row with no eos that is *shorter* than L (after dropping trailing ``pad_token_id``) raises
    ValueError: it was cut by something other than the cap (a prompt left in, a wrong eos id, a model
    position limit), and counting it either way would bias ``r_L``.

    Args:
        sequences: ``[N, T]`` generated tokens (``T <= L`` when decoded with ``max_new_tokens=L``; padded
            with ``pad_token_id`` after eos), or a list of ``N`` token-id lists.
        eos_token_id: the eos id, or several.
        max_new_tokens: ``L >= 1``.
        pad_token_id: padding id after eos; ``None`` when rows are not padded.
        terminated: optional ``[N]`` flags from the decoder (eos emitted). When given they must equal
            "row contains eos"; a mismatch raises ValueError (usually a wrong ``eos_token_id``).

    Returns:
        ``r_L`` in ``[0, 1]``.
    """
    _positive_int(max_new_tokens, name="max_new_tokens")
    eos = _eos_set(eos_token_id)
    rows = _as_rows(sequences)
    if terminated is not None:
        _check_terminated_flags(rows, eos, terminated)
    flags = _terminated_within(rows, eos, [max_new_tokens] * len(rows), pad_token_id)
    return flags.count(False) / len(flags)


def _check_terminated_flags(
    rows: list[list[int]], eos: frozenset[int], terminated: torch.Tensor | Sequence[bool]
) -> None:
    flags = terminated.tolist() if isinstance(terminated, torch.Tensor) else list(terminated)
    if len(flags) != len(rows):
        raise ValueError(f"terminated has {len(flags)} flags but sequences has {len(rows)} rows")
    for index, (row, flag) in enumerate(zip(rows, flags)):
        if bool(flag) != (_first_eos(row, eos) is not None):
            raise ValueError(
                f"terminated[{index}]={bool(flag)} disagrees with sequences[{index}], which "
                f"{'does not contain' if flag else 'contains'} eos {sorted(eos)}: check eos_token_id"
            )


def truncated_share(
    sequences: TokenRows,
    *,
    eos_token_id: EosIds,
    max_new_tokens: int | Sequence[int],
    pad_token_id: int | None = None,
) -> float:
    """Share of rows cut at their length cap without eos; the caps may differ per row.

    For machine translation, where each source gets its own cap (e.g. 1.3 x the reference length). With
    one cap for all rows this equals :func:`nontermination_ratio`. Rows without eos that are shorter
    than their cap raise ValueError, as there.

    Args:
        sequences: ``[N, T]`` generated tokens or ``N`` token-id lists.
        eos_token_id: the eos id, or several.
        max_new_tokens: one cap ``>= 1`` for all rows, or ``N`` caps.
        pad_token_id: padding id after eos, or ``None``.
    """
    eos = _eos_set(eos_token_id)
    rows = _as_rows(sequences)
    caps = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != len(rows):
        raise ValueError(f"max_new_tokens has {len(caps)} caps but sequences has {len(rows)} rows")
    for cap in caps:
        _positive_int(cap, name="max_new_tokens")
    flags = _terminated_within(rows, eos, caps, pad_token_id)
    return flags.count(False) / len(flags)


def length_ratio(gen_lengths: Sequence[int], ref_lengths: Sequence[int]) -> float:
    """Mean generated length over mean reference length (a ratio of means, not a mean of ratios).

    Args:
        gen_lengths: ``N`` lengths of the continuations (eos included, see :func:`generated_lengths`).
        ref_lengths: ``N`` lengths of the matching references (eos included).
    """
    gen, ref = list(gen_lengths), list(ref_lengths)
    if not gen:
        raise ValueError("gen_lengths is empty")
    if len(gen) != len(ref):
        raise ValueError(f"gen_lengths has {len(gen)} entries but ref_lengths has {len(ref)}")
    if min(gen) < 0 or min(ref) < 0:
        raise ValueError("lengths must be >= 0")
    if sum(ref) == 0:
        raise ValueError("ref_lengths are all 0: the ratio is undefined")
    return sum(gen) / sum(ref)


# ---------------------------------------------------------------------------------------------------------
# repetition


def seq_rep_n(tokens: Tokens, *, n: int = 4) -> float:
    """``1 - |unique n-grams| / |n-grams|`` of one continuation.

    A continuation with fewer than ``n`` tokens has no n-gram and scores 0.0 (no repetition observed).
    Pass the continuation without eos and padding (:func:`continuation_tokens`).
    """
    _positive_int(n, name="n")
    seq = _as_tokens(tokens)
    ngrams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    if not ngrams:
        return 0.0
    return 1.0 - len(set(ngrams)) / len(ngrams)


def rep(tokens: Tokens, *, window: int = 128) -> float:
    """Share of next tokens that already occur among the previous ``window`` tokens of one continuation.

    Positions ``t = 1 .. T-1`` are scored (the first token has no history; the prompt is not looked at);
    a continuation with fewer than 2 tokens scores 0.0.
    """
    _positive_int(window, name="window")
    seq = _as_tokens(tokens)
    last_seen: dict[int, int] = {}
    repeats = 0
    for t, token in enumerate(seq):
        if token in last_seen and t - last_seen[token] <= window:
            repeats += 1
        last_seen[token] = t
    return repeats / (len(seq) - 1) if len(seq) > 1 else 0.0


def mean_seq_rep_n(continuations: TokenRows, *, n: int = 4) -> float:
    """Mean of :func:`seq_rep_n` over continuations (each weighs the same, whatever its length)."""
    rows = _as_rows(continuations, name="continuations")
    return sum(seq_rep_n(row, n=n) for row in rows) / len(rows)


def mean_rep(continuations: TokenRows, *, window: int = 128) -> float:
    """Mean of :func:`rep` over continuations (each weighs the same, whatever its length)."""
    rows = _as_rows(continuations, name="continuations")
    return sum(rep(row, window=window) for row in rows) / len(rows)


# ---------------------------------------------------------------------------------------------------------
# perplexity


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """``exp(nll_sum / n_tokens)``: perplexity from a summed token NLL (natural log); inf on overflow."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int):
        raise TypeError(f"n_tokens must be an int, got {n_tokens!r}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    nll_sum = float(nll_sum)
    if math.isnan(nll_sum):
        raise ValueError("nll_sum is NaN")
    mean_nll = nll_sum / n_tokens
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def perplexity_from_log_probs(token_log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """Perplexity from the log-probabilities of the reference tokens.

    Args:
        token_log_probs: ``[B, T]`` float, ``log p(y_t | y_<t)`` of each reference token.
        mask: ``[B, T]`` bool (or 0/1), True on the tokens to score: real continuation tokens, with
            context positions and padding excluded.

    Returns:
        ``exp(-sum(log_probs * mask) / sum(mask))``, accumulated in float64.
    """
    if not token_log_probs.is_floating_point():
        raise TypeError(f"token_log_probs must be a float tensor, got dtype {token_log_probs.dtype}")
    if token_log_probs.shape != mask.shape:
        raise ValueError(
            f"token_log_probs {tuple(token_log_probs.shape)} and mask {tuple(mask.shape)} differ in shape"
        )
    keep = mask.bool()
    n_tokens = int(keep.sum())
    if n_tokens == 0:
        raise ValueError("mask selects no tokens")
    nll_sum = -token_log_probs.double()[keep].sum().item()
    return perplexity(nll_sum, n_tokens)


# ---------------------------------------------------------------------------------------------------------
# BLEU (sacrebleu, scores in 0..100)


def _check_texts(texts: Sequence[str], *, name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(texts)}")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a detokenised string, got {type(text)}")
    return out


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0..100) of detokenised hypotheses against one reference each.

    sacrebleu with its defaults: 13a tokenizer, exp smoothing, case-sensitive. The exact settings are
    given by :func:`corpus_bleu_signature`.
    """
    hyps = _check_texts(hypotheses, name="hypotheses")
    refs = _check_texts(references, name="references")
    if not hyps:
        raise ValueError("hypotheses is empty")
    if len(hyps) != len(refs):
        raise ValueError(f"hypotheses has {len(hyps)} entries but references has {len(refs)}")
    return float(BLEU().corpus_score(hyps, [refs]).score)


@lru_cache(maxsize=1)
def corpus_bleu_signature() -> str:
    """sacrebleu's signature of :func:`corpus_bleu` (e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|...``)."""
    metric = BLEU()
    metric.corpus_score(["a"], [["a"]])  # sacrebleu knows nrefs only after scoring; always 1 here
    return metric.get_signature().format()


@lru_cache(maxsize=1)
def _sentence_metric() -> BLEU:
    return BLEU(effective_order=True)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Sentence BLEU (0..100) with ``effective_order=True``; a per-sequence cost is ``1 - BLEU / 100``."""
    if not isinstance(hypothesis, str) or not isinstance(reference, str):
        raise TypeError("hypothesis and reference must be detokenised strings")
    return float(_sentence_metric().sentence_score(hypothesis, [reference]).score)
