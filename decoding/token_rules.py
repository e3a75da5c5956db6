"""transformers' token rules: sequence biases, bad words, suppressed tokens, prefix constraints.

Each rule is a pure function on ``scores [B, V]`` (and the rows' ``history [B, T]`` where it reads it) that
reproduces the transformers processor of the same role (``SequenceBiasLogitsProcessor``,
``NoBadWordsLogitsProcessor``, ``SuppressTokensLogitsProcessor``, ``SuppressTokensAtBeginLogitsProcessor``,
``PrefixConstrainedLogitsProcessor``, ``InfNanRemoveLogitsProcessor``). :func:`resolve_token_rules` validates
the options and :func:`rule_processors` turns them into the loop's processors.

With ``consistent=True`` no rule may stop a decode from ending: eos is never banned by a rule for an unbounded
number of steps. Bad-word and ``-inf``-bias sequences that end with eos are dropped (a lone ``[eos]`` bad
word is dropped by transformers itself), ``prefix_allowed_tokens_fn`` always allows eos, and options that
ban eos outright (``suppress_tokens`` or a ``[[eos], -inf]`` bias) raise ``ValueError``. Finite biases,
``begin_suppress_tokens`` (one step) and ``min_new_tokens`` stay as they are: eos keeps a positive share.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TokenRules", "SequenceBias", "resolve_token_rules", "sequence_bias", "suppress", "allowed_prefix",
           "remove_invalid", "rule_processors"]

_NEG_INF = float("-inf")
# (history [B, T], scores [B, V], prompt_index [B]) -> scores [B, V], the loop's processor signature
RuleProcessor = Callable[[torch.LongTensor, torch.Tensor, torch.LongTensor], torch.Tensor]
PrefixFn = Callable[[int, torch.Tensor], Sequence[int]]


@dataclass(frozen=True)
class TokenRules:
    """The token-rule options of one ``generate`` call, validated (eos rules of ``consistent`` applied)."""

    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()  # (token sequence, additive bias)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    prefix_allowed_tokens_fn: PrefixFn | None = None
    always_allowed: tuple[int, ...] = ()    # added to every prefix_allowed_tokens_fn answer (eos, if consistent)
    remove_invalid_values: bool = False
    renormalize_logits: bool = False


# ----------------------------------------------------------------------------------------------- resolution


def _token(value: Any, name: str, vocab_size: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= int(value) < vocab_size:
        raise ValueError(f"{name}: token ids must be integers in [0, {vocab_size}), got {value!r}")
    return int(value)


def _sequence(value: Any, name: str, vocab_size: int) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}: every entry must be a non-empty list of token ids, got {value!r}")
    return tuple(_token(token, name, vocab_size) for token in value)


def _token_list(value: Any, name: str, vocab_size: int) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids, got {value!r}")
    return tuple(_token(token, name, vocab_size) for token in value)


def _bias_pairs(value: Any, vocab_size: int) -> dict[tuple[int, ...], float]:
    """``[[ids, bias], ...]`` or ``{tuple(ids): bias}`` as a dict (a repeated sequence: the last bias wins)."""
    pairs = value.items() if isinstance(value, dict) else value
    if not isinstance(value, (dict, list, tuple)) or not value:
        raise ValueError(f"sequence_bias must be a non-empty list of [token ids, bias] pairs, got {value!r}")
    out: dict[tuple[int, ...], float] = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"sequence_bias: every entry must be a [token ids, bias] pair, got {pair!r}")
        ids, bias = pair
        if not isinstance(bias, numbers.Real) or isinstance(bias, bool) or math.isnan(bias) or bias == math.inf:
            raise ValueError(f"sequence_bias: biases must be real numbers (finite or -inf), got {bias!r}")
        out[_sequence(ids, "sequence_bias", vocab_size)] = float(bias)
    return out


def resolve_token_rules(config: Any, *, prefix_allowed_tokens_fn: PrefixFn | None, vocab_size: int,
                        eos_token_ids: Sequence[int], consistent: bool) -> TokenRules:
    """Validate the rule options of a ``GenerationConfig`` and apply the eos rules of ``consistent``."""
    eos = set(eos_token_ids)
    biases = {} if config.sequence_bias is None else _bias_pairs(config.sequence_bias, vocab_size)
    bad = config.bad_words_ids
    if bad is not None and (not isinstance(bad, (list, tuple)) or not bad):
        raise ValueError(f"bad_words_ids must be a non-empty list of lists of token ids, got {bad!r}")
    bad_words = [_sequence(words, "bad_words_ids", vocab_size) for words in bad or ()]
    bad_words = [words for words in bad_words if not (len(words) == 1 and words[0] in eos)]  # transformers' rule
    suppressed = _token_list(config.suppress_tokens, "suppress_tokens", vocab_size)
    begin = _token_list(config.begin_suppress_tokens, "begin_suppress_tokens", vocab_size)
    if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
        raise TypeError("prefix_allowed_tokens_fn must be a callable (batch_id, input_ids) -> list of token ids")
    if consistent:
        if eos & set(suppressed):
            raise ValueError(f"suppress_tokens bans eos ({sorted(eos & set(suppressed))}) at every step, so "
                             "consistent=True could never end a sequence: remove eos from suppress_tokens")
        if any(len(ids) == 1 and ids[0] in eos and bias == _NEG_INF for ids, bias in biases.items()):
            raise ValueError("sequence_bias gives eos a bias of -inf at every step, so consistent=True could never "
                             "end a sequence: use a finite bias")
        bad_words = [words for words in bad_words if words[-1] not in eos]
        biases = {ids: bias for ids, bias in biases.items() if not (ids[-1] in eos and bias == _NEG_INF)}
    return TokenRules(
        sequence_bias=tuple(biases.items()), bad_words_ids=tuple(bad_words), suppress_tokens=suppressed,
        begin_suppress_tokens=begin, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        always_allowed=tuple(sorted(eos)) if consistent and prefix_allowed_tokens_fn is not None else (),
        remove_invalid_values=bool(config.remove_invalid_values), renormalize_logits=bool(config.renormalize_logits),
    )


# ----------------------------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class SequenceBias:
    """Additive biases on token sequences, as tensors: the bias of a sequence goes to its last token when the
    row's history ends with the rest of it (always, for one-token sequences)."""

    single_ids: torch.LongTensor   # [S] distinct tokens biased on their own
    single_bias: torch.Tensor      # [S] their biases
    groups: tuple[tuple[torch.LongTensor, torch.LongTensor, torch.Tensor], ...]  # per prefix length L:
    # (prefixes [G, L], last tokens [G], biases [G])

    @classmethod
    def build(cls, biases: Sequence[tuple[Sequence[int], float]], *,
              device: torch.device | str = "cpu") -> "SequenceBias":
        """From distinct ``(token sequence, bias)`` pairs."""
        singles = [(ids[0], bias) for ids, bias in biases if len(ids) == 1]
        by_length: dict[int, list[tuple[Sequence[int], float]]] = {}
        for ids, bias in biases:
            if len(ids) > 1:
                by_length.setdefault(len(ids) - 1, []).append((ids, bias))
        groups = tuple((torch.tensor([list(ids[:-1]) for ids, _ in group], device=device),
                        torch.tensor([ids[-1] for ids, _ in group], device=device),
                        torch.tensor([bias for _, bias in group], dtype=torch.float32, device=device))
                       for group in by_length.values())
        return cls(single_ids=torch.tensor([token for token, _ in singles], dtype=torch.long, device=device),
                   single_bias=torch.tensor([bias for _, bias in singles], dtype=torch.float32, device=device),
                   groups=groups)


def sequence_bias(history: torch.LongTensor, scores: torch.Tensor, table: SequenceBias) -> torch.Tensor:
    """``scores`` plus the biases of the sequences each row can complete with its next token
    (SequenceBiasLogitsProcessor; NoBadWordsLogitsProcessor with biases of ``-inf``).

    Args:
        history: ``[B, T]`` the rows' tokens so far.
        scores: ``[B, V]``.
    Returns:
        ``[B, V]`` a new tensor.
    """
    bias = torch.zeros_like(scores)
    if table.single_ids.numel():
        bias[:, table.single_ids] = table.single_bias.to(scores.dtype)
    for prefixes, last, biases in table.groups:
        length = prefixes.shape[1]
        if length > history.shape[1]:
            continue
        matches = (history[:, None, -length:] == prefixes).all(dim=-1)             # [B, G]
        bias.index_add_(1, last, torch.where(matches, biases, 0.0).to(bias.dtype))
    return scores + bias


def suppress(scores: torch.Tensor, token_ids: torch.LongTensor) -> torch.Tensor:
    """``-inf`` on the columns ``token_ids`` (SuppressTokensLogitsProcessor); a new tensor."""
    return scores.index_fill(-1, token_ids, _NEG_INF)


def allowed_prefix(history: torch.LongTensor, scores: torch.Tensor, allowed: PrefixFn,
                   prompt_index: torch.LongTensor, *, always: Sequence[int] = ()) -> torch.Tensor:
    """Only the tokens ``allowed(prompt, row_history)`` names keep their scores (PrefixConstrainedLogitsProcessor).

    Where every row of a prompt has all its allowed tokens at ``-inf``, those tokens get score 0 instead, so
    the constraint still holds. ``always``: tokens added to every answer.

    Args:
        history: ``[B, T]``; prompt_index: ``[B]`` the prompt (transformers' ``batch_id``) of each row.
    """
    mask = torch.full_like(scores, _NEG_INF)
    for row, prompt in enumerate(prompt_index.tolist()):
        tokens = list(allowed(prompt, history[row]))
        if not tokens:
            raise ValueError(f"prefix_allowed_tokens_fn returned no token for batch ID {prompt}: the constraint "
                             "cannot be satisfied")
        mask[row, tokens + list(always)] = 0.0
    processed = scores + mask
    dead = processed.amax(dim=-1).isneginf()                                      # [B]
    live_rows = torch.zeros(int(prompt_index.max()) + 1, device=scores.device).index_add_(
        0, prompt_index, (~dead).to(torch.float32))
    unsatisfiable = (live_rows[prompt_index] == 0).unsqueeze(1)
    return torch.where(unsatisfiable, mask, processed)


def remove_invalid(scores: torch.Tensor) -> torch.Tensor:
    """NaN to 0, ``±inf`` to the dtype's largest finite values (InfNanRemoveLogitsProcessor); a new tensor."""
    finite = torch.finfo(scores.dtype)
    out = torch.where(scores.isnan(), 0.0, scores)
    out = torch.where(scores == math.inf, finite.max, out)
    return torch.where(scores == -math.inf, finite.min, out)


# ----------------------------------------------------------------------------------------------- processors


def rule_processors(rules: TokenRules, stage: str, *, begin_index: int, first_prompt: int = 0,
                    device: torch.device | str = "cpu") -> list[RuleProcessor]:
    """The processors of one place in transformers' chain.

    Args:
        stage: ``"bias"`` (sequence_bias, first), ``"ban"`` (bad words, after no_repeat_ngram), ``"prefix"``
            (after the length rules), ``"invalid"`` (after forced eos), ``"suppress"`` then ``"begin"``
            (``begin_suppress_tokens``; after the length decay).
        begin_index: the history length at which ``begin_suppress_tokens`` apply.
        first_prompt: the batch's first prompt in the call (``prefix_allowed_tokens_fn``'s batch ids).
    """
    chain: list[RuleProcessor] = []
    if stage == "bias" and rules.sequence_bias:
        table = SequenceBias.build(rules.sequence_bias, device=device)
        chain.append(lambda history, scores, _: sequence_bias(history, scores, table))
    elif stage == "ban" and rules.bad_words_ids:
        banned = SequenceBias.build([(ids, _NEG_INF) for ids in dict.fromkeys(rules.bad_words_ids)], device=device)
        chain.append(lambda history, scores, _: sequence_bias(history, scores, banned))
    elif stage == "prefix" and rules.prefix_allowed_tokens_fn is not None:
        allowed, always = rules.prefix_allowed_tokens_fn, rules.always_allowed
        chain.append(lambda history, scores, prompt_index: allowed_prefix(
            history, scores, allowed, prompt_index + first_prompt, always=always))
    elif stage == "invalid" and rules.remove_invalid_values:
        chain.append(lambda history, scores, _: remove_invalid(scores))
    elif stage == "suppress" and rules.suppress_tokens:
        suppressed = torch.tensor(rules.suppress_tokens, device=device)
        chain.append(lambda history, scores, _: suppress(scores, suppressed))
    elif stage == "begin" and rules.begin_suppress_tokens:
        begin = torch.tensor(rules.begin_suppress_tokens, device=device)
        chain.append(lambda history, scores, _: suppress(scores, begin) if history.shape[1] == begin_index
                     else scores)
    return chain
