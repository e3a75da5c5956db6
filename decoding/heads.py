"""Self-terminating output heads (ST and NMST): the math, in log space, over a time axis.

The final layer's logits are split in two: the eos logit ``z`` feeds a sigmoid ``s(z)`` and the other
logits a softmax over ``V \\ {eos}``. With ``eps`` in (0, 1) and ``t = 1, 2, ...`` counted from the first
*generated* position (context positions get ``p(eos) = 0`` and do not advance ``t``):

- **ST** (Welleck et al. 2020, "Consistency of a recurrent language model with respect to incomplete
  decoding"): ``log(1 - p(eos)) = sum_{t' <= t} [log(1 - eps) + log s(z_t')]``, so ``p(eos)`` never
  decreases.
- **NMST** (Choi et al. 2023, "A non-monotonic self-terminating language model"):
  ``log(1 - p(eos)) = log(1 - s(z_t)) + t * log(1 - eps)``.

In both, non-eos tokens share ``1 - p(eos)`` by the softmax, and ``p(eos) >= 1 - (1 - eps)^t``: greedy
decoding emits eos within :func:`termination_bound` generated tokens.

The math is written once (:func:`st_log_probs`, :func:`nmst_log_probs`, combined by
:func:`self_terminating_log_probs`). The full-sequence forward (training, perplexity) calls it on ``[B, T]``
positions; the one-step path (:func:`self_terminating_step`) calls the very same function on ``T = 1`` with
the running state (ST: ``log(1 - p(eos))`` so far; NMST: ``t`` so far). The running part is kept in float64:
with ``eps = 1e-5`` the bound's margin is about 1e-5 nats after 69,315 steps, which float32 sums would lose.

This module is pure torch: the wrappers that put a head on a model (a step model, a transformers model, the
library's RNN/LSTM LMs) live in :mod:`decoding.models`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "KINDS",
    "check_eos_token_id",
    "check_epsilon",
    "check_kind",
    "context_mask_from_labels",
    "initial_head_state",
    "nmst_log_probs",
    "self_terminating_log_probs",
    "self_terminating_step",
    "st_log_probs",
    "termination_bound",
]

Kind = Literal["st", "nmst"]
KINDS: tuple[str, ...] = ("st", "nmst")
_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------- validation
def check_epsilon(epsilon: Any) -> float:
    """Return ``epsilon`` as a float, or raise if it is not a real number in the open interval (0, 1)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a float in (0, 1), got {type(epsilon).__name__} {epsilon!r}")
    if not 0.0 < float(epsilon) < 1.0:
        raise ValueError(f"epsilon must be in the open interval (0, 1), got {epsilon!r}")
    return float(epsilon)


def check_kind(kind: Any) -> str:
    """Return ``kind`` or raise if it is not ``"st"`` or ``"nmst"``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_eos_token_id(eos_token_id: Any, vocab_size: int) -> int:
    """Return ``eos_token_id`` or raise if it is not an int in ``[0, vocab_size)``."""
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, numbers.Integral):
        raise TypeError(f"eos_token_id must be an int, got {type(eos_token_id).__name__} {eos_token_id!r}")
    if not 0 <= int(eos_token_id) < vocab_size:
        raise ValueError(f"eos_token_id must be in [0, {vocab_size}) (the vocabulary), got {eos_token_id}")
    return int(eos_token_id)


def termination_bound(epsilon: float) -> int:
    """``T(eps) = ceil(ln 2 / -ln(1 - eps))``: greedy decoding of an ST or NMST model emits eos within
    this many generated tokens, since then ``p(eos) >= 1 - (1 - eps)^T >= 1/2``.

    Example: ``termination_bound(1e-2) == 69``, ``termination_bound(1e-5) == 69315``.
    """
    epsilon = check_epsilon(epsilon)
    bound = _LN2 / -math.log1p(-epsilon)
    if not math.isfinite(bound):
        raise ValueError(f"epsilon={epsilon!r} is too small: the termination bound overflows")
    return math.ceil(bound)


# ---------------------------------------------------------------------------------------------- math
def _running_dtype(device: torch.device) -> torch.dtype:
    """float64 for the running ``log(1 - p(eos))`` (float32 where the device has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends, with finite gradients everywhere.

    Inputs at or above 0 are clamped just below 0; each branch sees only inputs where it is accurate, so
    the branch ``torch.where`` drops cannot send an inf or NaN gradient back.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near_zero, far)


def _as_context_mask(context_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if context_mask is None:
        return torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    if context_mask.shape != like.shape:
        raise ValueError(f"context_mask must have shape {tuple(like.shape)}, got {tuple(context_mask.shape)}")
    return context_mask.to(device=like.device, dtype=torch.bool)


def _checked_split(non_eos_logits: torch.Tensor, eos_logit: torch.Tensor, epsilon: Any,
                   context_mask: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    """The checked ``epsilon`` and the ``[..., T]`` bool context of logits split into non-eos and eos."""
    epsilon = check_epsilon(epsilon)
    if non_eos_logits.dim() < 2 or non_eos_logits.shape[:-1] != eos_logit.shape:
        raise ValueError(
            "non_eos_logits must be [..., T, V-1] and eos_logit [..., T]; got "
            f"{tuple(non_eos_logits.shape)} and {tuple(eos_logit.shape)}"
        )
    return epsilon, _as_context_mask(context_mask, eos_logit)


def _st_log_alive(
    eos_logit: torch.Tensor, epsilon: float, context: torch.Tensor, log_alive: torch.Tensor | None
) -> torch.Tensor:
    """ST's running ``log(1 - p_t(eos))`` ``[..., T]`` (running dtype), from ``log_alive [...]`` before."""
    running = _running_dtype(eos_logit.device)
    if log_alive is None:
        log_alive = initial_head_state("st", eos_logit.shape[:-1], eos_logit.device)
    elif log_alive.shape != eos_logit.shape[:-1]:
        raise ValueError(f"log_alive must have shape {tuple(eos_logit.shape[:-1])}, got {tuple(log_alive.shape)}")
    increments = F.logsigmoid(eos_logit.to(running)) + math.log1p(-epsilon)  # [..., T]
    increments = increments.masked_fill(context, 0.0)
    return log_alive.to(running).unsqueeze(-1) + increments.cumsum(dim=-1)


def _nmst_log_alive(
    eos_logit: torch.Tensor, epsilon: float, context: torch.Tensor, steps: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """NMST's ``log(1 - p_t(eos))`` ``[..., T]`` (running dtype) and ``t [..., T]``, from ``steps [...]``."""
    running = _running_dtype(eos_logit.device)
    if steps is None:
        steps = initial_head_state("nmst", eos_logit.shape[:-1], eos_logit.device)
    elif steps.shape != eos_logit.shape[:-1]:
        raise ValueError(f"steps must have shape {tuple(eos_logit.shape[:-1])}, got {tuple(steps.shape)}")
    t = steps.to(torch.long).unsqueeze(-1) + (~context).long().cumsum(dim=-1)  # [..., T]
    return F.logsigmoid(-eos_logit.to(running)) + t.to(running) * math.log1p(-epsilon), t


def _eos_and_alive(
    log_alive: torch.Tensor, context: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(eos), log(1 - p(eos)))`` ``[..., T]`` in ``out_dtype``; context gets ``p(eos) = 0``."""
    log_alive = log_alive.masked_fill(context, 0.0)
    log_p_eos = _log1mexp(log_alive).masked_fill(context, -math.inf)
    return log_p_eos.to(out_dtype), log_alive.to(out_dtype)


def _assemble(
    non_eos_logits: torch.Tensor, log_alive: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ``log(1 - p(eos))`` into log-probabilities; context positions get ``p(eos) = 0``.

    Shapes: ``non_eos_logits [..., T, V-1]``, ``log_alive [..., T]`` (running dtype), ``context [..., T]``.
    Returns ``(log_p_non_eos [..., T, V-1], log_p_eos [..., T])`` in ``promote(logits dtype, float32)``.
    """
    out_dtype = torch.promote_types(non_eos_logits.dtype, torch.float32)
    log_p_eos, log_alive = _eos_and_alive(log_alive, context, out_dtype)
    log_softmax = torch.log_softmax(non_eos_logits.to(out_dtype), dim=-1)
    return log_softmax + log_alive.unsqueeze(-1), log_p_eos


def _assemble_full(
    logits: torch.Tensor, eos: int, log_alive: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """:func:`_assemble` on the full vocabulary without splitting it: ``[..., T, V]`` log-probabilities.

    The eos column is masked to -inf in one copy of the logits, so the softmax runs over the other tokens
    without splitting the vocabulary and joining it again; the eos column is then overwritten in place.
    """
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p_eos, log_alive = _eos_and_alive(log_alive, context, out_dtype)
    masked = logits.to(out_dtype, copy=True)
    masked[..., eos] = -math.inf
    log_probs = torch.log_softmax(masked, dim=-1) + log_alive.unsqueeze(-1)
    log_probs[..., eos] = log_p_eos
    return log_probs


def st_log_probs(
    non_eos_logits: torch.Tensor,
    eos_logit: torch.Tensor,
    *,
    epsilon: float,
    context_mask: torch.Tensor | None = None,
    log_alive: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ST layer over a time axis: ``log(1 - p_t(eos)) = log_alive + sum_{t' <= t} log((1 - eps) s(z_t'))``.

    Args:
        non_eos_logits: ``[..., T, V-1]`` the logits of every token but eos.
        eos_logit: ``[..., T]`` the eos logit ``z``.
        epsilon: in (0, 1).
        context_mask: ``[..., T]`` bool, True where the position predicts a context token: ``p(eos) = 0``
            there and the product is not advanced. None: no context.
        log_alive: ``[...]`` running ``log(1 - p(eos))`` before the first position (0, i.e. none yet,
            when None).

    Returns:
        ``(log_p_non_eos [..., T, V-1], log_p_eos [..., T], log_alive [...])``, the last being the state
        after position ``T`` (float64), to pass to the next call.
    """
    epsilon, context = _checked_split(non_eos_logits, eos_logit, epsilon, context_mask)
    running_log_alive = _st_log_alive(eos_logit, epsilon, context, log_alive)
    log_p_non_eos, log_p_eos = _assemble(non_eos_logits, running_log_alive, context)
    return log_p_non_eos, log_p_eos, running_log_alive[..., -1]


def nmst_log_probs(
    non_eos_logits: torch.Tensor,
    eos_logit: torch.Tensor,
    *,
    epsilon: float,
    context_mask: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NMST layer over a time axis: ``log(1 - p_t(eos)) = log(1 - s(z_t)) + t * log(1 - eps)``.

    Args:
        non_eos_logits: ``[..., T, V-1]`` the logits of every token but eos.
        eos_logit: ``[..., T]`` the eos logit ``z``.
        epsilon: in (0, 1).
        context_mask: ``[..., T]`` bool, True where the position predicts a context token: ``p(eos) = 0``
            there and ``t`` does not advance. None: no context.
        steps: ``[...]`` long, generated positions before the first one here (0 when None).

    Returns:
        ``(log_p_non_eos [..., T, V-1], log_p_eos [..., T], steps [...])``, the last being ``t`` after
        position ``T``, to pass to the next call.
    """
    epsilon, context = _checked_split(non_eos_logits, eos_logit, epsilon, context_mask)
    log_alive, t = _nmst_log_alive(eos_logit, epsilon, context, steps)
    log_p_non_eos, log_p_eos = _assemble(non_eos_logits, log_alive, context)
    return log_p_non_eos, log_p_eos, t[..., -1]


def initial_head_state(kind: str, batch_shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """The head state before any generated position: ST ``log(1 - p(eos)) = 0`` (float64), NMST ``t = 0``."""
    device = torch.device(device)
    if check_kind(kind) == "st":
        return torch.zeros(batch_shape, dtype=_running_dtype(device), device=device)
    return torch.zeros(batch_shape, dtype=torch.long, device=device)


def self_terminating_log_probs(
    logits: torch.Tensor,
    *,
    kind: str,
    epsilon: float,
    eos_token_id: int,
    context_mask: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary self-terminating log-probabilities from raw output-layer logits.

    Column ``eos_token_id`` of ``logits`` is the eos logit (the eos row of the output layer); the other
    columns are the softmax logits.

    Args:
        logits: ``[..., T, V]`` raw logits.
        kind: ``"st"`` or ``"nmst"``.
        epsilon: in (0, 1).
        eos_token_id: in ``[0, V)``.
        context_mask: ``[..., T]`` bool, True where the position predicts a context token.
        state: ``[...]`` head state before the first position (see :func:`initial_head_state`); None
            starts fresh.

    Returns:
        ``(log_probs [..., T, V], state [...])``: normalised log-probabilities (float32 or wider) and the
        head state after the last position.
    """
    kind = check_kind(kind)
    eos = check_eos_token_id(eos_token_id, logits.shape[-1])
    epsilon = check_epsilon(epsilon)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., T, V], got shape {tuple(logits.shape)}")
    eos_logit = logits[..., eos]  # [..., T]
    context = _as_context_mask(context_mask, eos_logit)
    if kind == "st":
        log_alive = _st_log_alive(eos_logit, epsilon, context, state)
        state = log_alive[..., -1]
    else:
        log_alive, t = _nmst_log_alive(eos_logit, epsilon, context, state)
        state = t[..., -1]
    return _assemble_full(logits, eos, log_alive, context), state


def self_terminating_step(
    logits: torch.Tensor, state: torch.Tensor | None, *, kind: str, epsilon: float, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: :func:`self_terminating_log_probs` on a single, generated position.

    Args:
        logits: ``[B, V]`` raw logits for the next token.
        state: ``[B]`` head state so far (None: no generated position yet).

    Returns:
        ``(log_probs [B, V], state [B])``.
    """
    log_probs, state = self_terminating_log_probs(
        logits.unsqueeze(-2), kind=kind, epsilon=epsilon, eos_token_id=eos_token_id, state=state
    )
    return log_probs.squeeze(-2), state


def context_mask_from_labels(labels: torch.LongTensor, *, shifted: bool) -> torch.Tensor:
    """Context positions from labels: position ``i`` is context when the label it predicts is -100.

    Args:
        labels: ``[B, T]`` with -100 on tokens that are not predicted (context, padding).
        shifted: True for causal LMs (position ``i`` predicts ``labels[:, i + 1]``; the last position
            predicts a token yet to come and is not context); False for encoder-decoders (position ``i``
            predicts ``labels[:, i]``).

    Returns:
        ``[B, T]`` bool.
    """
    ignored = labels == -100
    if not shifted:
        return ignored
    return torch.cat([ignored[:, 1:], torch.zeros_like(ignored[:, :1])], dim=1)
