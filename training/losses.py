"""Losses: token-level MLE, and the sequence-level MRT and policy-gradient objectives.

The sequence-level losses are pure functions of per-candidate scores, so they can be checked by hand and
with :func:`torch.autograd.gradcheck`; :func:`teacher_forced_logprobs` supplies those scores from a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["teacher_forced_logits", "mle_loss", "teacher_forced_logprobs", "length_normalised",
           "mrt_loss", "pg_loss", "MovingAverageBaseline"]


def _shift_right(targets: torch.LongTensor, start_token_id: int) -> torch.LongTensor:
    start = torch.full_like(targets[:, :1], start_token_id)
    return torch.cat([start, targets[:, :-1]], dim=1)


def _decoder_start(model: torch.nn.Module) -> int:
    value = getattr(model.config, "decoder_start_token_id", None)
    if value is None:
        value = model.config.bos_token_id
    return int(value)


def teacher_forced_logits(model: torch.nn.Module, source_ids: torch.LongTensor,
                          source_mask: torch.LongTensor, targets: torch.LongTensor,
                          target_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of ``targets [B, T]`` given the sources, one per target position.

    Encoder-decoder models read the source with the encoder and ``<start> + targets[:-1]`` with the
    decoder. Decoder-only models read ``source + targets`` (source left-padded) and the logits at the
    positions just before each target token are returned.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        decoder_input_ids = _shift_right(targets, _decoder_start(model))
        return model(input_ids=source_ids, attention_mask=source_mask,
                     decoder_input_ids=decoder_input_ids, use_cache=False).logits
    inputs = torch.cat([source_ids, targets], dim=1)
    mask = torch.cat([source_mask, target_mask.long()], dim=1)
    logits = model(input_ids=inputs, attention_mask=mask, use_cache=False).logits
    width = source_ids.shape[1]
    return logits[:, width - 1: width - 1 + targets.shape[1]]


def mle_loss(model: torch.nn.Module, source_ids: torch.LongTensor, source_mask: torch.LongTensor,
             targets: torch.LongTensor, target_mask: torch.Tensor, *, label_smoothing: float = 0.0
             ) -> torch.Tensor:
    """Mean token negative log-likelihood of ``targets`` (``[B, T]``, mask ``[B, T]``), a scalar.

    ``label_smoothing`` in ``[0, 1)`` mixes the one-hot target with the uniform distribution.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = teacher_forced_logits(model, source_ids, source_mask, targets, target_mask)  # [B, T, V]
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none",
                                label_smoothing=label_smoothing)                          # [B*T]
    weights = target_mask.flatten().float()
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


def teacher_forced_logprobs(model: torch.nn.Module, source_ids: torch.LongTensor,
                            source_mask: torch.LongTensor, tokens: torch.LongTensor, mask: torch.Tensor
                            ) -> torch.Tensor:
    """Token log-probabilities ``[N, L]`` of hypotheses ``tokens [N, L]`` (zero where ``mask`` is 0).

    ``source_ids [N, S]`` must already be repeated to one row per hypothesis.
    """
    logits = teacher_forced_logits(model, source_ids, source_mask, tokens, mask)           # [N, L, V]
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    return logprobs * mask


def length_normalised(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence scores ``[...]``: summed token log-probs over ``[..., L]`` divided by the length."""
    return (token_logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def mrt_loss(scores: torch.Tensor, costs: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Minimum risk training loss (a scalar) over ``K`` candidates per source.

    ``Q = softmax_k(scores)`` over each row of ``scores [B, K]`` (length-normalised log-probabilities),
    costs divided by the batch maximum (``scale``: the maximum over a larger batch these rows are part of);
    loss ``= mean_b sum_k cost_bk * Q_bk``.
    """
    if scores.shape != costs.shape or scores.dim() != 2:
        raise ValueError(f"scores and costs must both be [B, K], got {tuple(scores.shape)} and "
                         f"{tuple(costs.shape)}")
    largest = max(float(scale if scale is not None else costs.max()), 1e-12)
    return (costs / largest * torch.softmax(scores, dim=1)).sum(dim=1).mean()


def pg_loss(scores: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE loss (a scalar): ``-mean_b sum_k advantage_bk * score_bk`` for ``[B, K]`` inputs.

    ``advantages`` are treated as constants (detached).
    """
    if scores.shape != advantages.shape or scores.dim() != 2:
        raise ValueError(f"scores and advantages must both be [B, K], got {tuple(scores.shape)} and "
                         f"{tuple(advantages.shape)}")
    return -(advantages.detach() * scores).sum(dim=1).mean()


class MovingAverageBaseline:
    """Exponential moving average of the mean reward: ``b <- m * b + (1 - m) * mean(reward)``.

    Advantages are computed with the baseline *before* the current batch is folded in; on the very first
    batch, when there is no baseline yet, ``b`` starts at that batch's mean reward.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.value: float | None = None

    def advantages(self, rewards: torch.Tensor, *, mean: float | None = None) -> torch.Tensor:
        """``rewards - b``, then fold ``rewards`` into ``b``: ``b <- m b + (1 - m) mean(rewards)``
        (``mean``: the mean reward of a larger batch these rows are part of)."""
        mean = float(rewards.detach().mean()) if mean is None else float(mean)
        baseline = mean if self.value is None else self.value
        self.value = self.momentum * baseline + (1 - self.momentum) * mean
        return rewards - baseline

    def state_dict(self) -> dict[str, float | None]:
        return {"momentum": self.momentum, "value": self.value}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.momentum, self.value = float(state["momentum"]), state["value"]
