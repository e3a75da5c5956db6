"""Pure logits transforms: truncation keep-masks, temperature, penalties and length constraints.

Every function here is pure: it returns a new tensor (or, where nothing changes, the input itself) and
never writes into its arguments. Each one reproduces the transformers (5.x) processor or warper of the same
role, bit for bit on the kept sets, including tie handling and ``min_tokens_to_keep``.

Truncation rules come as boolean *keep-masks* ``[B, V]`` (True = the rule does not remove the entry; an
entry that is already ``-inf`` stays ``-inf`` after masking whatever the mask says). A consistent sampler
(Welleck et al. 2020, "Consistency of a recurrent language model with respect to incomplete decoding":
candidate set ``V'_t = V_t ∪ {eos}``, ``p`` renormalised over it) is then one ``|``::

    kept = truncation_keep(scores, Truncation(top_p=0.9))   # [B, V]
    kept = with_eos(kept, eos_token_ids)                     # V' = V_mu ∪ {eos}
    scores = mask_scores(scores, kept)                       # eos keeps its own score

which is what ``truncate(scores, truncation, eos_token_ids=eos, consistent=True)`` does. eos is not
boosted: the kept scores are renormalised by the sampler's softmax, so ``q(eos) >= p(eos)``.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Truncation",
    "apply_temperature",
    "check_temperature",
    "top_k_keep",
    "top_p_keep",
    "min_p_keep",
    "typical_keep",
    "epsilon_keep",
    "eta_keep",
    "truncation_keep",
    "with_eos",
    "mask_scores",
    "truncate",
    "repetition_penalty",
    "no_repeat_ngram",
    "min_length",
    "forced_bos",
    "forced_eos",
    "exponential_decay_length_penalty",
    "as_token_ids",
]

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------- checks


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: object, *, low: int) -> int:
    if not _is_int(value) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_real(
    name: str, value: object, *, low: float, high: float, low_open: bool, high_open: bool
) -> float:
    """``value`` as a float inside the interval, else a ValueError naming ``name`` and the interval."""
    ok = _is_real(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be a float in {interval}, got {value!r}")
    return float(value)


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"`scores` must be a floating-point tensor of shape [B, V], got {got}")


def _check_history(history: torch.Tensor, scores: torch.Tensor) -> None:
    if not isinstance(history, torch.Tensor) or history.dim() != 2 or history.is_floating_point():
        got = tuple(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__
        raise ValueError(f"`history` must be an integer tensor of shape [B, T], got {got}")
    if history.shape[0] != scores.shape[0]:
        raise ValueError(f"`history` has {history.shape[0]} rows but `scores` has {scores.shape[0]}")


def as_token_ids(
    token_ids: int | Sequence[int] | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    name: str = "eos_token_ids",
) -> torch.LongTensor:
    """Token id(s) as a 1-D LongTensor ``[E]`` on ``device``; ValueError naming ``name`` if not ids.

    A tensor input is checked for shape and dtype only (no host sync); Python ints are checked for sign.
    """
    if isinstance(token_ids, torch.Tensor):
        if token_ids.is_floating_point() or token_ids.dtype == torch.bool or token_ids.dim() > 1:
            raise ValueError(
                f"`{name}` must be an int, a list of ints or a 1-D integer tensor, got {token_ids!r}"
            )
        if token_ids.numel() == 0:
            raise ValueError(f"`{name}` must not be empty")
        return token_ids.reshape(-1).to(device=device, dtype=torch.long)
    ids = [token_ids] if _is_int(token_ids) else token_ids
    if not isinstance(ids, Sequence) or len(ids) == 0 or not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(
            f"`{name}` must be a non-negative int or a non-empty list of them, got {token_ids!r}"
        )
    return torch.tensor([int(i) for i in ids], dtype=torch.long, device=device)


# ------------------------------------------------------------------------------------------ truncation


@dataclass(frozen=True)
class Truncation:
    """Truncation rules, with transformers' meanings and 'off' values.

    The rules are applied in transformers' order (top-k, top-p, min-p, typical, epsilon, eta), each on the
    scores left by the previous ones. Temperature is not a truncation rule: apply it before.

    Attributes:
        top_k: keep the ``top_k`` highest scores (all ties of the k-th kept); 0 = off.
        top_p: nucleus mass in (0, 1]; 1.0 = off.
        min_p: keep tokens with ``p >= min_p * max p``, in (0, 1]; None = off.
        typical_p: locally typical mass in (0, 1]; 1.0 = off.
        epsilon_cutoff: keep tokens with ``p >= epsilon``, in [0, 1); 0 = off.
        eta_cutoff: eta-sampling epsilon in [0, 1); 0 = off.
        min_tokens_to_keep: every active rule keeps at least this many tokens (>= 1).
    """

    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        _check_int("top_k", self.top_k, low=0)
        _check_real("top_p", self.top_p, low=0.0, high=1.0, low_open=True, high_open=False)
        if self.min_p is not None:
            _check_real("min_p", self.min_p, low=0.0, high=1.0, low_open=True, high_open=False)
        _check_real("typical_p", self.typical_p, low=0.0, high=1.0, low_open=True, high_open=False)
        _check_real("epsilon_cutoff", self.epsilon_cutoff, low=0.0, high=1.0, low_open=False, high_open=True)
        _check_real("eta_cutoff", self.eta_cutoff, low=0.0, high=1.0, low_open=False, high_open=True)
        _check_int("min_tokens_to_keep", self.min_tokens_to_keep, low=1)

    @property
    def active(self) -> bool:
        """Whether any rule is switched on."""
        return bool(self.rules())

    def rules(self) -> tuple[Callable[[torch.Tensor], torch.BoolTensor], ...]:
        """The active rules in transformers' order, each a function ``scores [B, V] -> keep [B, V]``."""
        keep_min = self.min_tokens_to_keep
        rules: list[Callable[[torch.Tensor], torch.BoolTensor]] = []
        if self.top_k != 0:
            rules.append(lambda s: top_k_keep(s, self.top_k, min_tokens_to_keep=keep_min))
        if self.top_p < 1.0:
            rules.append(lambda s: top_p_keep(s, self.top_p, min_tokens_to_keep=keep_min))
        if self.min_p is not None:
            rules.append(lambda s: min_p_keep(s, self.min_p, min_tokens_to_keep=keep_min))
        if self.typical_p < 1.0:
            rules.append(lambda s: typical_keep(s, self.typical_p, min_tokens_to_keep=keep_min))
        if self.epsilon_cutoff > 0.0:
            rules.append(lambda s: epsilon_keep(s, self.epsilon_cutoff, min_tokens_to_keep=keep_min))
        if self.eta_cutoff > 0.0:
            rules.append(lambda s: eta_keep(s, self.eta_cutoff, min_tokens_to_keep=keep_min))
        return tuple(rules)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``scores / temperature`` (transformers' TemperatureLogitsWarper).

    Args:
        scores: ``[B, V]`` logits.
        temperature: > 0.

    Returns:
        ``[B, V]`` new tensor.
    """
    return scores / check_temperature(temperature)


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float, or a ValueError unless it is a finite number > 0."""
    if not _is_real(temperature) or temperature <= 0:
        raise ValueError(f"`temperature` must be a float > 0, got {temperature!r} (use greedy search for 0)")
    return float(temperature)


def _round_to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _all_kept(scores: torch.Tensor) -> torch.BoolTensor:
    return torch.ones_like(scores, dtype=torch.bool)


def _top_scores_keep(scores: torch.Tensor, count: int) -> torch.BoolTensor:
    """True on every score >= the ``count``-th largest of its row (ties included)."""
    count = min(count, scores.shape[-1])
    kth = torch.topk(scores, count, dim=-1).values[:, -1:]  # [B, 1]
    return scores >= kth


def _unsort(sorted_mask: torch.BoolTensor, order: torch.LongTensor) -> torch.BoolTensor:
    """Undo a sort: ``out[b, order[b, i]] = sorted_mask[b, i]``."""
    return torch.empty_like(sorted_mask).scatter_(-1, order, sorted_mask)


def top_k_keep(scores: torch.Tensor, top_k: int, *, min_tokens_to_keep: int = 1) -> torch.BoolTensor:
    """Keep-mask of top-k (TopKLogitsWarper): scores >= the ``max(top_k, min_tokens_to_keep)``-th largest.

    Args:
        scores: ``[B, V]`` logits.
        top_k: >= 0; 0 = off (everything kept). Values above V keep everything.
        min_tokens_to_keep: >= 1.

    Returns:
        ``[B, V]`` bool; all ties of the k-th score are kept.
    """
    _check_scores(scores)
    top_k = _check_int("top_k", top_k, low=0)
    min_tokens_to_keep = _check_int("min_tokens_to_keep", min_tokens_to_keep, low=1)
    if top_k == 0:
        return _all_kept(scores)
    return _top_scores_keep(scores, max(top_k, min_tokens_to_keep))


def top_p_keep(scores: torch.Tensor, top_p: float, *, min_tokens_to_keep: int = 1) -> torch.BoolTensor:
    """Keep-mask of nucleus sampling (TopPLogitsWarper).

    Keeps the smallest set of most probable tokens whose mass reaches ``top_p``: in ascending order, a token
    is dropped when the cumulative mass up to and including it is ``<= 1 - top_p``; the ``min_tokens_to_keep``
    most probable are always kept.

    Args:
        scores: ``[B, V]`` logits.
        top_p: in (0, 1]; 1.0 = off.
        min_tokens_to_keep: >= 1.

    Returns:
        ``[B, V]`` bool.
    """
    _check_scores(scores)
    top_p = _check_real("top_p", top_p, low=0.0, high=1.0, low_open=True, high_open=False)
    min_tokens_to_keep = _check_int("min_tokens_to_keep", min_tokens_to_keep, low=1)
    if top_p == 1.0:
        return _all_kept(scores)
    keep, unsure = _top_p_from_head(scores, top_p, min_tokens_to_keep)
    if unsure.any():
        keep[unsure] = _top_p_by_sort(scores[unsure], top_p, min_tokens_to_keep)
    return keep


def _top_p_by_sort(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int) -> torch.BoolTensor:
    """The rule itself, on a full ascending sort (as TopPLogitsWarper computes it)."""
    ascending, order = torch.sort(scores, dim=-1)  # [B, V]
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    keep_sorted = mass_below > 1.0 - top_p
    keep_sorted[:, -min_tokens_to_keep:] = True  # our own fresh tensor
    return _unsort(keep_sorted, order)


# A nucleus rarely holds more than a few dozen tokens, and a full sort of a 30k-50k vocabulary dominates the
# step. The head of each row (its top ``_HEAD`` tokens) settles the row when the decision is clear-cut: a
# token is kept iff the mass strictly above it is < top_p, and a row is settled when the head already holds a
# dropped token, no head token lies within ``_MARGIN`` of the threshold (the full sort's rounding differs
# from the head's by ~1e-7) and no tie straddles the boundary. Unsettled rows take the full sort, so the
# mask is the full sort's on every row.
_HEAD = 128
_MARGIN = 1e-5


def _top_p_from_head(
    scores: torch.Tensor, top_p: float, min_tokens_to_keep: int
) -> tuple[torch.BoolTensor, torch.BoolTensor]:
    """(keep mask, rows left unsettled); unsettled rows' mask is left all False."""
    batch, vocab = scores.shape
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if scores.dtype not in (torch.float32, torch.float64) or vocab <= _HEAD or min_tokens_to_keep >= _HEAD:
        return keep, torch.ones(batch, dtype=torch.bool, device=scores.device)
    head_scores, head_ids = torch.topk(scores, _HEAD, dim=-1)  # [B, H], descending
    head_probs = scores.softmax(dim=-1).gather(-1, head_ids).double()  # (logsumexp is ~10x slower on CPU)
    mass_above = head_probs.cumsum(dim=-1) - head_probs  # exclusive: mass strictly above each head token
    kept = mass_above < top_p
    kept[:, :min_tokens_to_keep] = True
    last_kept = kept.sum(dim=-1, keepdim=True) - 1  # [B, 1]; kept is a prefix
    boundary_tie = head_scores.gather(-1, last_kept) == head_scores.gather(-1, (last_kept + 1).clamp(max=_HEAD - 1))
    unsure = (
        kept[:, -1]  # no dropped token in the head
        | ((mass_above - top_p).abs() <= _MARGIN).any(dim=-1)
        | boundary_tie.squeeze(-1)
        | ~torch.isfinite(mass_above).all(dim=-1)
    )
    keep.scatter_(-1, head_ids, kept)
    keep[unsure] = False
    return keep, unsure


def min_p_keep(scores: torch.Tensor, min_p: float, *, min_tokens_to_keep: int = 1) -> torch.BoolTensor:
    """Keep-mask of min-p sampling (MinPLogitsWarper): ``p >= min_p * max p`` or among the most probable.

    Args:
        scores: ``[B, V]`` logits.
        min_p: in (0, 1].
        min_tokens_to_keep: >= 1 (the most probable tokens by ``torch.topk`` order).

    Returns:
        ``[B, V]`` bool.
    """
    _check_scores(scores)
    min_p = _check_real("min_p", min_p, low=0.0, high=1.0, low_open=True, high_open=False)
    min_tokens_to_keep = _check_int("min_tokens_to_keep", min_tokens_to_keep, low=1)
    probs = scores.softmax(dim=-1)
    keep = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    most_probable = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    return keep.scatter(-1, most_probable, True)


def typical_keep(scores: torch.Tensor, mass: float, *, min_tokens_to_keep: int = 1) -> torch.BoolTensor:
    """Keep-mask of locally typical sampling (TypicalLogitsWarper).

    Tokens are ranked by ``|-log p - H(p)|`` (closest to the entropy first); the kept set is every token whose
    distance does not exceed that of the first token at which the cumulative mass reaches ``mass``, plus the
    first ``min_tokens_to_keep`` of the ranking.

    Args:
        scores: ``[B, V]`` logits.
        mass: in (0, 1]; 1.0 = off.
        min_tokens_to_keep: >= 1.

    Returns:
        ``[B, V]`` bool.
    """
    _check_scores(scores)
    mass = _check_real("mass", mass, low=0.0, high=1.0, low_open=True, high_open=False)
    min_tokens_to_keep = _check_int("min_tokens_to_keep", min_tokens_to_keep, low=1)
    if mass == 1.0:
        return _all_kept(scores)
    log_probs = scores.log_softmax(dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)  # [B, 1]; 0 * -inf -> nan, skipped
    distance = (log_probs + entropy).abs()  # = |-log p - H|
    distance_sorted, order = torch.sort(distance, dim=-1)
    mass_so_far = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (mass_so_far < mass).sum(dim=-1, keepdim=True).clamp(max=scores.shape[-1] - 1)  # [B, 1]
    keep_sorted = distance_sorted <= distance_sorted.gather(-1, last)
    keep_sorted[:, :min_tokens_to_keep] = True  # our own fresh tensor
    return _unsort(keep_sorted, order)


def epsilon_keep(scores: torch.Tensor, epsilon: float, *, min_tokens_to_keep: int = 1) -> torch.BoolTensor:
    """Keep-mask of epsilon sampling (EpsilonLogitsWarper): ``p >= epsilon`` or among the top scores.

    Args:
        scores: ``[B, V]`` logits.
        epsilon: in [0, 1); 0 = off.
        min_tokens_to_keep: >= 1 (ties of the last one kept too).

    Returns:
        ``[B, V]`` bool.
    """
    _check_scores(scores)
    epsilon = _check_real("epsilon", epsilon, low=0.0, high=1.0, low_open=False, high_open=True)
    min_tokens_to_keep = _check_int("min_tokens_to_keep", min_tokens_to_keep, low=1)
    if epsilon == 0.0:
        return _all_kept(scores)
    return (scores.softmax(dim=-1) >= epsilon) | _top_scores_keep(scores, min_tokens_to_keep)


def eta_keep(scores: torch.Tensor, epsilon: float, *, min_tokens_to_keep: int = 1) -> torch.BoolTensor:
    """Keep-mask of eta sampling (EtaLogitsWarper): ``p >= min(epsilon, sqrt(epsilon) * exp(-H(p)))``.

    Args:
        scores: ``[B, V]`` logits.
        epsilon: in [0, 1); 0 = off.
        min_tokens_to_keep: >= 1 (the top scores, ties of the last one included, are always kept).

    Returns:
        ``[B, V]`` bool.
    """
    _check_scores(scores)
    epsilon = _check_real("epsilon", epsilon, low=0.0, high=1.0, low_open=False, high_open=True)
    min_tokens_to_keep = _check_int("min_tokens_to_keep", min_tokens_to_keep, low=1)
    if epsilon == 0.0:
        return _all_kept(scores)
    # entropy computed as torch.distributions.Categorical does, so the cut-off matches to the last bit
    log_probs = scores - scores.logsumexp(dim=-1, keepdim=True)
    clamped = log_probs.clamp(min=torch.finfo(scores.dtype).min)
    entropy = -(clamped * log_probs.softmax(dim=-1)).sum(dim=-1, keepdim=True)  # [B, 1]
    epsilon = _round_to_float32(epsilon)  # transformers keeps epsilon in a float32 tensor
    eta = (_round_to_float32(math.sqrt(epsilon)) * torch.exp(-entropy)).clamp(max=epsilon)
    return (scores.softmax(dim=-1) >= eta) | _top_scores_keep(scores, min_tokens_to_keep)


def truncation_keep(scores: torch.Tensor, truncation: Truncation) -> torch.BoolTensor:
    """The kept set of all active rules, chained as transformers chains its warpers.

    Each rule sees the scores already masked to ``-inf`` by the previous ones.

    Args:
        scores: ``[B, V]`` logits (temperature already applied).
        truncation: the rules.

    Returns:
        ``[B, V]`` bool; all True when no rule is active.
    """
    _check_scores(scores)
    if not isinstance(truncation, Truncation):
        raise TypeError(f"`truncation` must be a Truncation, got {type(truncation).__name__}")
    rules = truncation.rules()
    if not rules:
        return _all_kept(scores)
    kept = rules[0](scores)
    for rule in rules[1:]:
        kept = kept & rule(mask_scores(scores, kept))
    return kept


def with_eos(
    keep: torch.BoolTensor, eos_token_ids: int | Sequence[int] | torch.LongTensor
) -> torch.BoolTensor:
    """``keep`` with the eos column(s) set: the consistent candidate set ``V_t ∪ {eos}``.

    Args:
        keep: ``[B, V]`` bool.
        eos_token_ids: ``[E]`` eos id(s) (an int or a list also accepted), each in ``[0, V)``.

    Returns:
        ``[B, V]`` new bool tensor.
    """
    eos = as_token_ids(eos_token_ids, device=keep.device)
    return keep.index_fill(-1, eos, True)


def mask_scores(scores: torch.Tensor, keep: torch.BoolTensor) -> torch.Tensor:
    """``where(keep, scores, -inf)`` as a new tensor.

    Args:
        scores: ``[B, V]``.
        keep: ``[B, V]`` bool.
    """
    return scores.masked_fill(~keep, _NEG_INF)


def truncate(
    scores: torch.Tensor,
    truncation: Truncation,
    *,
    eos_token_ids: int | Sequence[int] | torch.LongTensor | None = None,
    consistent: bool = False,
) -> torch.Tensor:
    """The whole truncation step of a (consistent) sampler.

    ``kept = truncation_keep(scores, truncation)``; if ``consistent``, eos is added back to ``kept`` with its
    own score, so the sampler's softmax renormalises ``p`` over ``V_t ∪ {eos}`` and ``q(eos) >= p(eos)``
    (a consistent sampler in the sense of Welleck et al. 2020).

    Args:
        scores: ``[B, V]`` logits, temperature already applied.
        truncation: the rules.
        eos_token_ids: ``[E]`` eos id(s); required when ``consistent``.
        consistent: keep eos whatever the rules say.

    Returns:
        ``[B, V]`` scores with the removed entries at ``-inf``; the input itself when no rule is active.
    """
    if not isinstance(truncation, Truncation):
        raise TypeError(f"`truncation` must be a Truncation, got {type(truncation).__name__}")
    if consistent and eos_token_ids is None:
        raise ValueError("`eos_token_ids` is required when `consistent=True`")
    if not truncation.active:
        _check_scores(scores)
        return scores
    kept = truncation_keep(scores, truncation)
    if consistent:
        kept = with_eos(kept, eos_token_ids)
    return mask_scores(scores, kept)


# ------------------------------------------------------------------------------ penalties, constraints


def repetition_penalty(
    history: torch.LongTensor,
    scores: torch.Tensor,
    penalty: float,
    *,
    prompt_ignore_length: int | torch.LongTensor | None = None,
) -> torch.Tensor:
    """CTRL repetition penalty (RepetitionPenaltyLogitsProcessor): every token seen in ``history`` once.

    A seen token's score ``s`` becomes ``s * penalty`` if ``s < 0`` else ``s / penalty``. Ids ``>= V`` in the
    history are ignored.

    Args:
        history: ``[B, T]`` the prompt (with its left padding) followed by the generated tokens.
        scores: ``[B, V]`` logits.
        penalty: > 0; 1.0 changes nothing, > 1 discourages repeats.
        prompt_ignore_length: leading columns of ``history`` to ignore, an int or ``[B]`` per row.

    Returns:
        ``[B, V]`` new tensor.
    """
    _check_scores(scores)
    _check_history(history, scores)
    if not _is_real(penalty) or penalty <= 0:
        raise ValueError(f"`penalty` must be a float > 0, got {penalty!r}")
    batch, vocab = scores.shape
    ids = history.clamp(max=vocab)  # [B, T]; out-of-vocab ids go to a spare column
    if isinstance(prompt_ignore_length, torch.Tensor):
        if prompt_ignore_length.dim() != 1 or prompt_ignore_length.shape[0] != batch:
            raise ValueError(
                f"`prompt_ignore_length` must have shape [{batch}], got {tuple(prompt_ignore_length.shape)}"
            )
        columns = torch.arange(ids.shape[1], device=ids.device)
        ignored = columns[None, :] < prompt_ignore_length.to(ids.device)[:, None]
        ids = ids.masked_fill(ignored, vocab)
    elif prompt_ignore_length is not None:
        ids = ids[:, _check_int("prompt_ignore_length", prompt_ignore_length, low=0) :]
    seen = torch.zeros((batch, vocab + 1), dtype=torch.bool, device=scores.device)
    seen = seen.scatter(1, ids, True)[:, :vocab]
    penalised = torch.where(scores < 0, scores * float(penalty), scores / float(penalty))
    return torch.where(seen, penalised, scores)


def no_repeat_ngram(history: torch.LongTensor, scores: torch.Tensor, ngram_size: int) -> torch.Tensor:
    """Ban every token that would complete an n-gram already in ``history`` (NoRepeatNGramLogitsProcessor).

    The last ``ngram_size - 1`` tokens are compared with every earlier window of that length; the token that
    followed each match is banned (``-inf``). Vectorised over rows and windows; no host sync.

    Args:
        history: ``[B, T]`` the prompt followed by the generated tokens.
        scores: ``[B, V]`` logits.
        ngram_size: >= 1.

    Returns:
        ``[B, V]``: a new tensor, or ``scores`` itself while ``T < ngram_size``.
    """
    _check_scores(scores)
    _check_history(history, scores)
    ngram_size = _check_int("ngram_size", ngram_size, low=1)
    length = history.shape[1]
    if length < ngram_size:
        return scores
    windows = length - ngram_size + 1  # window w covers history[:, w : w + ngram_size]
    suffix_start = length - ngram_size + 1
    matches = torch.ones((history.shape[0], windows), dtype=torch.bool, device=history.device)
    for offset in range(ngram_size - 1):  # compare column by column: no [B, W, n] tensor
        current = history[:, suffix_start + offset : suffix_start + offset + 1]  # [B, 1]
        matches &= history[:, offset : offset + windows] == current
    vocab = scores.shape[1]
    followers = history[:, ngram_size - 1 :].clamp(max=vocab)  # [B, W] last token of each window
    banned = torch.zeros((history.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    banned = banned.scatter(1, followers.masked_fill(~matches, vocab), True)[:, :vocab]
    return scores.masked_fill(banned, _NEG_INF)


def min_length(
    scores: torch.Tensor,
    eos_token_ids: int | Sequence[int] | torch.LongTensor,
    *,
    cur_len: int,
    min_length: int,
    in_place: bool = False,
) -> torch.Tensor:
    """eos scores to ``-inf`` while ``cur_len < min_length`` (MinLengthLogitsProcessor).

    For MinNewTokensLengthLogitsProcessor pass the number of generated tokens as ``cur_len`` and
    ``min_new_tokens`` as ``min_length``.

    Args:
        scores: ``[B, V]`` logits.
        eos_token_ids: ``[E]`` eos id(s) in ``[0, V)``.
        cur_len: current length (prompt included for decoder-only models, as in transformers).
        min_length: >= 0.
        in_place: write the ``-inf`` into ``scores`` itself (only for scores nobody else holds).

    Returns:
        ``[B, V]``: a new tensor (``scores`` when ``in_place``), or ``scores`` once the minimum is reached.
    """
    _check_scores(scores)
    cur_len = _check_int("cur_len", cur_len, low=0)
    min_length = _check_int("min_length", min_length, low=0)
    eos = as_token_ids(eos_token_ids, device=scores.device)
    if cur_len >= min_length:
        return scores
    if in_place:
        return scores.index_fill_(-1, eos, _NEG_INF)
    return scores.index_fill(-1, eos, _NEG_INF)


def _only(scores: torch.Tensor, token_ids: torch.LongTensor) -> torch.Tensor:
    """``-inf`` everywhere except 0 on the columns ``token_ids``."""
    return torch.full_like(scores, _NEG_INF).index_fill(-1, token_ids, 0.0)


def forced_bos(scores: torch.Tensor, bos_token_id: int, *, cur_len: int) -> torch.Tensor:
    """At ``cur_len == 1`` only ``bos_token_id`` is allowed (ForcedBOSTokenLogitsProcessor).

    Args:
        scores: ``[B, V]`` logits.
        bos_token_id: in ``[0, V)``.
        cur_len: current decoder length (1 = only the decoder start token so far).

    Returns:
        ``[B, V]``: ``-inf`` except 0 on bos at ``cur_len == 1``, else ``scores`` itself.
    """
    _check_scores(scores)
    bos_token_id = _check_int("bos_token_id", bos_token_id, low=0)
    cur_len = _check_int("cur_len", cur_len, low=0)
    if cur_len != 1:
        return scores
    return _only(scores, torch.tensor([bos_token_id], device=scores.device))


def forced_eos(
    scores: torch.Tensor,
    eos_token_ids: int | Sequence[int] | torch.LongTensor,
    *,
    cur_len: int,
    max_length: int,
) -> torch.Tensor:
    """At ``cur_len == max_length - 1`` only eos is allowed (ForcedEOSTokenLogitsProcessor).

    Args:
        scores: ``[B, V]`` logits.
        eos_token_ids: ``[E]`` eos id(s) in ``[0, V)``.
        cur_len: current length.
        max_length: >= 1, the length the output must not exceed.

    Returns:
        ``[B, V]``: ``-inf`` except 0 on the eos columns at the last step, else ``scores`` itself.
    """
    _check_scores(scores)
    cur_len = _check_int("cur_len", cur_len, low=0)
    max_length = _check_int("max_length", max_length, low=1)
    eos = as_token_ids(eos_token_ids, device=scores.device)
    if cur_len != max_length - 1:
        return scores
    return _only(scores, eos)


def exponential_decay_length_penalty(
    scores: torch.Tensor,
    eos_token_ids: int | Sequence[int] | torch.LongTensor,
    *,
    cur_len: int,
    input_len: int,
    start_index: int,
    decay_factor: float,
) -> torch.Tensor:
    """Raise the eos score exponentially after ``start_index`` new tokens (ExponentialDecayLengthPenalty).

    With ``i = cur_len - (start_index + input_len) > 0``, each finite eos score ``s`` becomes
    ``s + |s| * (decay_factor ** i - 1)``.

    Args:
        scores: ``[B, V]`` logits.
        eos_token_ids: ``[E]`` eos id(s) in ``[0, V)``.
        cur_len: current length (prompt included).
        input_len: prompt length.
        start_index: >= 0, number of new tokens before the penalty starts.
        decay_factor: > 0 (> 1 favours eos more and more).

    Returns:
        ``[B, V]``: a new tensor once the penalty is on, else ``scores`` itself.
    """
    _check_scores(scores)
    cur_len = _check_int("cur_len", cur_len, low=0)
    input_len = _check_int("input_len", input_len, low=0)
    start_index = _check_int("start_index", start_index, low=0)
    if not _is_real(decay_factor) or decay_factor <= 0:
        raise ValueError(f"`decay_factor` must be a float > 0, got {decay_factor!r}")
    eos = as_token_ids(eos_token_ids, device=scores.device)
    steps = cur_len - (start_index + input_len)
    if steps <= 0:
        return scores
    eos_scores = scores[:, eos]  # [B, E] (advanced indexing: a copy)
    boost = eos_scores.abs() * (float(decay_factor) ** steps - 1)
    boost = boost.masked_fill(~torch.isfinite(eos_scores), 0.0)
    out = scores.clone()
    out[:, eos] = eos_scores + boost
    return out
