"""Self-terminating output layers (ST and NMST): the model-side fix for non-termination.

The final layer's logits are split in two: the eos logit ``z`` feeds a sigmoid ``s(z)`` and the other
logits a softmax over ``V \\ {eos}``. With ``eps`` in (0, 1) and ``t = 1, 2, ...`` counted from the first
*generated* position (context positions get ``p(eos) = 0`` and do not advance ``t``):

- **ST** (Welleck et al. 2020): ``log(1 - p(eos)) = sum_{t' <= t} [log(1 - eps) + log s(z_t')]``, so
  ``p(eos)`` never decreases.
- **NMST** (Choi, Cho, Lee 2023): ``log(1 - p(eos)) = log(1 - s(z_t)) + t * log(1 - eps)``.

In both, non-eos tokens share ``1 - p(eos)`` by the softmax, and ``p(eos) >= 1 - (1 - eps)^t``: greedy
decoding emits eos within :func:`termination_bound` generated tokens.

The math is written once, in log space, over a time axis (:func:`st_log_probs`, :func:`nmst_log_probs`,
combined by :func:`self_terminating_log_probs`). The full-sequence forward (training, perplexity) calls it
on ``[B, T]`` positions; the one-step path (:func:`self_terminating_step`, used by
:class:`SelfTerminatingStepModel`) calls the very same function on ``T = 1`` with the running state
(ST: ``log(1 - p(eos))`` so far; NMST: ``t`` so far). The running part is kept in float64: with
``eps = 1e-5`` the bound's margin is about 1e-5 nats after 69,315 steps, which float32 sums would lose.

:func:`make_self_terminating` turns any transformers causal LM or encoder-decoder into a self-terminating
model (:class:`SelfTerminatingLM`) whose forward returns normalised log-probabilities, so transformers'
loss and ``Trainer`` train it unchanged, and whose ``as_step_model()`` plugs into ``decoding.generate``.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from .protocol import StepModel

__all__ = [
    "KINDS",
    "SelfTerminatingLM",
    "SelfTerminatingState",
    "SelfTerminatingStepModel",
    "context_mask_from_labels",
    "initial_head_state",
    "load_self_terminating",
    "make_self_terminating",
    "nmst_log_probs",
    "save_self_terminating",
    "self_terminating_log_probs",
    "self_terminating_step",
    "st_log_probs",
    "termination_bound",
]

Kind = Literal["st", "nmst"]
KINDS: tuple[str, ...] = ("st", "nmst")
CONFIG_NAME = "self_terminating.json"
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


def _check_logit_shapes(non_eos_logits: torch.Tensor, eos_logit: torch.Tensor) -> None:
    if non_eos_logits.dim() < 2 or non_eos_logits.shape[:-1] != eos_logit.shape:
        raise ValueError(
            "non_eos_logits must be [..., T, V-1] and eos_logit [..., T]; got "
            f"{tuple(non_eos_logits.shape)} and {tuple(eos_logit.shape)}"
        )


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
    epsilon = check_epsilon(epsilon)
    _check_logit_shapes(non_eos_logits, eos_logit)
    context = _as_context_mask(context_mask, eos_logit)
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
    epsilon = check_epsilon(epsilon)
    _check_logit_shapes(non_eos_logits, eos_logit)
    context = _as_context_mask(context_mask, eos_logit)
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


# ---------------------------------------------------------------------------------------- step model
class SelfTerminatingState(NamedTuple):
    """State of a :class:`SelfTerminatingStepModel`: the inner model's and the head's, ``head [B]``."""

    inner: Any
    head: torch.Tensor


class SelfTerminatingStepModel:
    """Wrap a step model that returns raw logits into one that returns ST / NMST log-probabilities.

    ``prefill`` starts the head fresh (prompt tokens do not consume the eps budget: ``t = 1`` is the
    first generated token); ``select`` reorders the inner state and the head state together.

    Example::

        step_model = SelfTerminatingStepModel(hf_step_model(gpt2), kind="nmst", epsilon=1e-3,
                                              eos_token_id=50256)
        log_probs, state, prefix = step_model.prefill(input_ids, attention_mask)   # [B, V]
    """

    fresh_logits = True  # the head computes new log-probabilities at every call

    def __init__(self, inner: StepModel, *, kind: str, epsilon: float, eos_token_id: int) -> None:
        if not all(callable(getattr(inner, name, None)) for name in ("prefill", "step", "select")):
            raise TypeError(f"inner must be a StepModel (prefill/step/select), got {type(inner).__name__}")
        self.inner = inner
        self.kind = check_kind(kind)
        self.epsilon = check_epsilon(epsilon)
        self.vocab_size = int(inner.vocab_size)
        self.eos_token_id = check_eos_token_id(eos_token_id, self.vocab_size)
        self.is_encoder_decoder = bool(getattr(inner, "is_encoder_decoder", False))
        if callable(getattr(inner, "merge", None)):  # mergeable exactly when the inner model is
            self.merge = self._merge
            self.mergeable = lambda state: getattr(inner, "mergeable", lambda _: True)(state.inner)

    def uncached(self) -> SelfTerminatingStepModel:
        """The same head over the inner model's uncached variant (``generate(..., use_cache=False)``)."""
        if not callable(getattr(self.inner, "uncached", None)):
            raise NotImplementedError(f"use_cache=False is not supported for {type(self.inner).__name__}")
        return SelfTerminatingStepModel(
            self.inner.uncached(), kind=self.kind, epsilon=self.epsilon, eos_token_id=self.eos_token_id
        )

    def reserving(self, new_tokens: int) -> SelfTerminatingStepModel:
        """The same head over the inner model with KV-cache room for ``new_tokens`` (when it reserves)."""
        if not callable(getattr(self.inner, "reserving", None)):
            return self
        return SelfTerminatingStepModel(
            self.inner.reserving(new_tokens), kind=self.kind, epsilon=self.epsilon, eos_token_id=self.eos_token_id
        )

    def starting_with(self, decoder_start_token_id: int) -> SelfTerminatingStepModel:
        """Encoder-decoders: the same head over the inner model started with ``decoder_start_token_id``."""
        if not callable(getattr(self.inner, "starting_with", None)):
            raise NotImplementedError(f"decoder_start_token_id: {type(self.inner).__name__} has no starting_with")
        return SelfTerminatingStepModel(self.inner.starting_with(decoder_start_token_id), kind=self.kind,
                                        epsilon=self.epsilon, eos_token_id=self.eos_token_id)

    def model_cache(self, state: SelfTerminatingState) -> Any:
        """The inner model's transformers cache, when it has one (None otherwise)."""
        inner_cache = getattr(self.inner, "model_cache", None)
        return inner_cache(state.inner) if callable(inner_cache) else None

    def _head(self, logits: torch.Tensor, head_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self_terminating_step(
            logits, head_state, kind=self.kind, epsilon=self.epsilon, eos_token_id=self.eos_token_id
        )

    def prefill(
        self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor
    ) -> tuple[torch.Tensor, SelfTerminatingState, torch.LongTensor]:
        """Prefill the inner model; returns ``(log_probs [B, V], state, prefix [B, P])``."""
        logits, inner_state, prefix = self.inner.prefill(input_ids, attention_mask)
        log_probs, head_state = self._head(logits, None)
        return log_probs, SelfTerminatingState(inner_state, head_state), prefix

    def prefill_encoded(
        self, encoder_hidden: torch.Tensor, encoder_mask: torch.LongTensor, decoder_input_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, SelfTerminatingState, torch.LongTensor]:
        """Encoder-decoders: prefill from encoder states ``[B, S, H]`` computed elsewhere."""
        if not callable(getattr(self.inner, "prefill_encoded", None)):
            raise NotImplementedError(f"{type(self.inner).__name__} has no prefill_encoded")
        logits, inner_state, prefix = self.inner.prefill_encoded(encoder_hidden, encoder_mask, decoder_input_ids)
        log_probs, head_state = self._head(logits, None)
        return log_probs, SelfTerminatingState(inner_state, head_state), prefix

    def step(self, tokens: torch.LongTensor, state: SelfTerminatingState) -> tuple[torch.Tensor, SelfTerminatingState]:
        """Feed ``tokens [B]``; returns ``(log_probs [B, V], state)``."""
        logits, inner_state = self.inner.step(tokens, state.inner)
        log_probs, head_state = self._head(logits, state.head)
        return log_probs, SelfTerminatingState(inner_state, head_state)

    def select(self, state: SelfTerminatingState, index: torch.LongTensor) -> SelfTerminatingState:
        """Rows ``index [B']`` of both the inner state and the head state."""
        head = state.head.index_select(0, index.to(state.head.device))
        return SelfTerminatingState(self.inner.select(state.inner, index), head)

    def _merge(self, state: SelfTerminatingState, other: SelfTerminatingState) -> SelfTerminatingState:
        """The rows of ``state`` followed by those of ``other``, inner and head state alike."""
        return SelfTerminatingState(self.inner.merge(state.inner, other.inner), torch.cat([state.head, other.head]))



# ------------------------------------------------------------------------------ transformers wrapper
def _output_vocab_size(model: Any) -> int:
    """Rows of the model's output layer (the logits' last dimension), or raise naming ``model``."""
    from transformers import PreTrainedModel  # local import: keep the math importable without it

    if isinstance(model, SelfTerminatingLM):
        raise TypeError("model is already self-terminating; pass its .base to convert it again")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    output_layer = model.get_output_embeddings()
    weight = getattr(output_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"model ({type(model).__name__}) has no output layer with one row per token to split into "
            "eos and non-eos rows; use a causal LM or encoder-decoder with an LM head"
        )
    return int(weight.shape[0])


def _default_eos_token_id(model: Any) -> int:
    """The model's single eos id from its generation config or config, or raise naming ``eos_token_id``."""
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"the model has several eos ids {list(eos)}: pass eos_token_id= to pick one")
        eos = eos[0]
    if eos is None:
        raise ValueError("the model's config names no eos token: pass eos_token_id=")
    return eos


class SelfTerminatingLM(torch.nn.Module):
    """A transformers causal LM or encoder-decoder with an ST / NMST output layer.

    Build it with :func:`make_self_terminating`. The wrapped model is ``.base`` (weights shared, not
    copied); the eos row of its output layer gives the sigmoid's logit, the other rows the softmax.

    ``forward`` returns the base model's output with ``logits`` replaced by normalised log-probabilities
    ``[B, T, V]`` and ``loss`` computed by transformers' own loss on them (their cross-entropy equals the
    NLL), so ``transformers.Trainer`` trains it unchanged. Context positions (``p(eos) = 0``, ``t`` not
    advanced) come from ``labels == -100`` or an explicit ``context_mask``, plus padding.

    ``as_step_model()`` gives the step model ``decoding.generate`` drives: the base model's KV-cached
    adapter under a :class:`SelfTerminatingStepModel`. ``save_pretrained`` / ``from_pretrained`` round-trip
    the base model and the head's kind, epsilon and eos id.
    """

    def __init__(self, base: Any, *, kind: str, epsilon: float, eos_token_id: int) -> None:
        super().__init__()
        vocab_size = _output_vocab_size(base)
        self.base = base
        self.kind = check_kind(kind)
        self.epsilon = check_epsilon(epsilon)
        self.eos_token_id = check_eos_token_id(eos_token_id, vocab_size)
        self.vocab_size = vocab_size
        self.generation_config = self._generation_config()
        self._takes_position_ids = "position_ids" in inspect.signature(base.forward).parameters

    def _generation_config(self) -> Any:
        from transformers import GenerationConfig

        base_config = getattr(self.base, "generation_config", None)
        config = GenerationConfig() if base_config is None else GenerationConfig.from_dict(base_config.to_dict())
        config.eos_token_id = self.eos_token_id
        if config.pad_token_id is None:
            config.pad_token_id = self.eos_token_id
        return config

    @property
    def config(self) -> Any:
        """The base model's ``PretrainedConfig``."""
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.base.config, "is_encoder_decoder", False))

    def head_log_probs(
        self, logits: torch.Tensor, *, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``logits [B, T, V]`` (raw) -> self-terminating log-probabilities ``[B, T, V]``, t from 1."""
        log_probs, _ = self_terminating_log_probs(
            logits, kind=self.kind, epsilon=self.epsilon, eos_token_id=self.eos_token_id, context_mask=context_mask
        )
        return log_probs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        *,
        labels: torch.LongTensor | None = None,
        context_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
    ) -> Any:
        """Run the base model and the head.

        Args:
            input_ids: ``[B, S]`` (the decoder input for a causal LM, the encoder input otherwise).
            attention_mask: ``[B, S]``, 0 on padding.
            labels: ``[B, T]`` targets with -100 on context and padding, as transformers expects (a causal
                LM shifts them inside the loss). Positions predicting a -100 label are context.
            context_mask: ``[B, T]`` bool, aligned with the output positions: True where the position
                predicts a context token. Overrides the context taken from ``labels``.
            position_ids: ``[B, S]``, causal LMs only; by default counted over real tokens
                (``attention_mask.cumsum(-1) - 1``), as generation does, so left-padded rows score as
                they decode.
            decoder_input_ids, decoder_attention_mask: ``[B, T]``, encoder-decoders only; built from
                ``labels`` by the base model when omitted.

        Returns:
            The base model's output type with ``logits`` = log-probabilities ``[B, T, V]`` (float32 or
            wider) and ``loss`` = mean NLL over labelled tokens (None without labels).
        """
        if self.is_encoder_decoder:
            if decoder_input_ids is None and labels is not None:
                decoder_input_ids = self.base.prepare_decoder_input_ids_from_labels(labels=labels)
            outputs = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                use_cache=False,
            )
            padding = decoder_attention_mask
        else:
            if position_ids is None and attention_mask is not None and self._takes_position_ids:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            positions = {} if position_ids is None else {"position_ids": position_ids}
            outputs = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **positions)
            padding = attention_mask
        context = self._context(outputs.logits, labels=labels, context_mask=context_mask, padding=padding)
        log_probs = self.head_log_probs(outputs.logits, context_mask=context)
        loss = None if labels is None else self._loss(log_probs, labels)
        fields = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
        return type(outputs)(loss=loss, logits=log_probs, **fields)

    def _context(
        self,
        logits: torch.Tensor,
        *,
        labels: torch.LongTensor | None,
        context_mask: torch.Tensor | None,
        padding: torch.LongTensor | None,
    ) -> torch.Tensor:
        """``[B, T]`` bool: explicit mask, else labels == -100 (shifted for causal LMs); padding too."""
        if context_mask is not None:
            if context_mask.shape != logits.shape[:-1]:
                raise ValueError(
                    f"context_mask must have shape {tuple(logits.shape[:-1])}, got {tuple(context_mask.shape)}"
                )
            context = context_mask.to(device=logits.device, dtype=torch.bool)
        elif labels is not None:
            context = context_mask_from_labels(labels.to(logits.device), shifted=not self.is_encoder_decoder)
        else:
            context = torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        if padding is not None:
            context = context | (padding.to(logits.device) == 0)
        return context

    def _loss(self, log_probs: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """transformers' own loss on the log-probabilities (= mean NLL of the labelled tokens)."""
        if self.is_encoder_decoder:
            return F.cross_entropy(
                log_probs.reshape(-1, self.vocab_size), labels.to(log_probs.device).reshape(-1), ignore_index=-100
            )
        return self.base.loss_function(logits=log_probs, labels=labels, vocab_size=self.vocab_size)

    def as_step_model(self) -> SelfTerminatingStepModel:
        """The KV-cached step model of the base model under the self-terminating head."""
        from .adapters import hf_step_model  # local import: adapters pulls in transformers

        return SelfTerminatingStepModel(
            hf_step_model(self.base), kind=self.kind, epsilon=self.epsilon, eos_token_id=self.eos_token_id
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Same as :func:`save_self_terminating`."""
        save_self_terminating(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> SelfTerminatingLM:
        """Same as :func:`load_self_terminating`."""
        return load_self_terminating(directory, dtype=dtype)


def make_self_terminating(
    model: Any, *, kind: str, epsilon: float, eos_token_id: int | None = None
) -> SelfTerminatingLM:
    """Turn a transformers causal LM or encoder-decoder into a self-terminating one.

    Args:
        model: a ``PreTrainedModel`` with an LM head (``get_output_embeddings()``); its weights are shared.
        kind: ``"st"`` (monotonic p(eos)) or ``"nmst"`` (non-monotonic).
        epsilon: in (0, 1); greedy decoding stops within ``termination_bound(epsilon)`` new tokens.
        eos_token_id: the token whose output row feeds the sigmoid; defaults to the model's eos.

    Returns:
        A :class:`SelfTerminatingLM`.

    Example::

        model = make_self_terminating(GPT2LMHeadModel(config), kind="nmst", epsilon=1e-2)
        out = decoding.generate(model, input_ids, max_new_tokens=100)   # stops within 69 new tokens
    """
    check_kind(kind)
    check_epsilon(epsilon)
    vocab_size = _output_vocab_size(model)
    eos = _default_eos_token_id(model) if eos_token_id is None else eos_token_id
    check_eos_token_id(eos, vocab_size)
    return SelfTerminatingLM(model, kind=kind, epsilon=epsilon, eos_token_id=eos)


def save_self_terminating(model: SelfTerminatingLM, directory: str | os.PathLike) -> None:
    """Save the base model (``save_pretrained``) and the head's kind, epsilon and eos id
    (``self_terminating.json``) into ``directory``."""
    if not isinstance(model, SelfTerminatingLM):
        raise TypeError(f"model must be a SelfTerminatingLM, got {type(model).__name__}")
    directory = Path(directory)
    model.base.save_pretrained(directory)
    head = {"kind": model.kind, "epsilon": model.epsilon, "eos_token_id": model.eos_token_id}
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(head, indent=2) + "\n")
    os.replace(tmp, directory / CONFIG_NAME)


def load_self_terminating(directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> SelfTerminatingLM:
    """Load what :func:`save_self_terminating` wrote, from local files only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    directory = Path(directory)
    head_file = directory / CONFIG_NAME
    if not head_file.is_file():
        raise FileNotFoundError(f"{head_file} not found: directory was not written by save_self_terminating")
    head = json.loads(head_file.read_text())
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    base = auto.from_pretrained(directory, local_files_only=True, dtype=dtype)
    return make_self_terminating(base, kind=head["kind"], epsilon=head["epsilon"], eos_token_id=head["eos_token_id"])
