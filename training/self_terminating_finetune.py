"""Turn any causal LM into a self-terminating one, and choose its epsilon from the data.

The recipe: :func:`decoding.make_self_terminating` puts an ST or NMST head on the model, the eos row is fitted
so that the new head starts from the model's own stopping behaviour, and a few hundred MLE steps on the
user's text teach the rest::

    from training import choose_epsilon, finetune_self_terminating

    sequences = [tokenizer(text)["input_ids"] for text in documents]     # eos is appended where missing
    choice = choose_epsilon([len(s) + 1 for s in sequences], max_perplexity_increase=0.02)
    model = finetune_self_terminating(base, sequences, kind="nmst", epsilon=choice.epsilon, steps=300)
    model.save_pretrained("my-nmst-model")           # kind and epsilon travel with the weights

What epsilon costs. With ``t`` counting generated tokens from 1, both heads cap the probability of
*continuing* at step ``t`` by ``(1 - eps)^t``. So:

- greedy decoding stops within ``T(eps) = ceil(ln 2 / -ln(1 - eps))`` tokens (:func:`decoding.termination_bound`);
- any sampler that keeps eos among its candidates (ancestral, consistent top-k / nucleus: renormalising over
  a kept set can only raise ``p(eos)``) is still running after ``L`` tokens with probability at most
  ``(1 - eps)^(L (L + 1) / 2)`` (:func:`sampled_nontermination_bound`) - far below the greedy bound's
  promise: ``eps = 1e-5`` leaves at most 0.7 % of samples unfinished at ``L = 1,000``;
- a training sequence of ``n`` tokens (eos included) pays at least ``-ln(1 - eps) n (n - 1) / 2`` nats more
  than a model free to continue, since its ``n - 1`` non-eos tokens each come after a forced eos share. Per
  token over a corpus that is ``-ln(1 - eps) sum n(n - 1) / (2 sum n)``: the perplexity factor
  :func:`perplexity_tax` predicts. It grows with the *square* of the length: the long tail sets the price.

:func:`choose_epsilon` takes the lengths of the user's sequences and returns the largest ``eps`` whose
predicted perplexity factor stays within a budget and whose ``T(eps)`` sits at or above a high quantile of
the lengths (so greedy decoding is never forced to stop before a length the data reach).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decoding.self_terminating import SelfTerminatingLM, check_epsilon, make_self_terminating, termination_bound

from .lm import collate_lm_batch
from .loop import LoopPosition, Progress, gradient_step, run_loop

__all__ = [
    "EpsilonChoice",
    "choose_epsilon",
    "finetune_self_terminating",
    "fit_eos_row",
    "perplexity_tax",
    "sampled_nontermination_bound",
]


# ----------------------------------------------------------------------------------------- epsilon
def _check_lengths(lengths: Sequence[int]) -> list[int]:
    values = [int(n) for n in lengths]
    if not values or any(n < 1 for n in values) or any(n != m for n, m in zip(values, lengths)):
        raise ValueError("lengths must be a non-empty list of positive integers (tokens per sequence, eos included)")
    return values


def perplexity_tax(lengths: Sequence[int], epsilon: float) -> float:
    """The least factor by which an ST / NMST head with ``epsilon`` multiplies the perplexity of sequences of
    these ``lengths`` (generated tokens, eos included, counted from where ``t`` starts), compared with the
    same next-token choices under a head free to continue: ``exp(-ln(1 - eps) sum n(n-1) / (2 sum n))``.

    Example: ``perplexity_tax([100] * 10, 1e-3)`` is about ``exp(0.0495) = 1.051``.
    """
    values = _check_lengths(lengths)
    epsilon = check_epsilon(epsilon)
    pairs = sum(n * (n - 1) for n in values) / 2
    return math.exp(-math.log1p(-epsilon) * pairs / sum(values))


def sampled_nontermination_bound(epsilon: float, max_new_tokens: int) -> float:
    """Upper bound ``(1 - eps)^(L (L + 1) / 2)`` on the probability that a sampler keeping eos among its
    candidates (ancestral, consistent top-k / nucleus) has not emitted eos within ``L = max_new_tokens``.

    Example: ``sampled_nontermination_bound(1e-5, 1000)`` is about 0.0067.
    """
    epsilon = check_epsilon(epsilon)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    return math.exp(math.log1p(-epsilon) * max_new_tokens * (max_new_tokens + 1) / 2)


@dataclass(frozen=True)
class EpsilonChoice:
    """What :func:`choose_epsilon` picked and why.

    Attributes:
        epsilon: the chosen epsilon.
        tail_length: the ``quantile`` of the lengths.
        termination_bound: ``T(epsilon)``, at least ``tail_length``: greedy decoding stops within it.
        perplexity_factor: :func:`perplexity_tax` of the lengths at ``epsilon`` (the least price).
        limited_by: ``"perplexity"`` (the budget set epsilon) or ``"tail"`` (T(eps) >= tail_length did).
    """

    epsilon: float
    tail_length: int
    termination_bound: int
    perplexity_factor: float
    limited_by: str


def _epsilon_with_bound_at_least(length: int) -> float:
    """The epsilon at which the unrounded bound ``ln 2 / -ln(1 - eps)`` equals ``length`` (so that
    ``termination_bound(epsilon) == length``): ``p(eos) >= 1/2`` is forced no earlier than ``length``."""
    epsilon = -math.expm1(-math.log(2.0) / length)
    while termination_bound(epsilon) < length:  # rounding: step down until the bound holds
        epsilon = math.nextafter(epsilon, 0.0)
    return epsilon


def choose_epsilon(
    lengths: Sequence[int], *, quantile: float = 0.99, max_perplexity_increase: float = 0.02
) -> EpsilonChoice:
    """The largest epsilon that keeps the predicted perplexity factor (:func:`perplexity_tax`) at or below
    ``1 + max_perplexity_increase`` and the greedy bound ``ln 2 / -ln(1 - eps)`` at or above the ``quantile``
    of ``lengths``.

    Args:
        lengths: tokens per sequence (eos included) from where ``t`` starts: the whole sequence when training
            on documents, the continuation when generating after a prompt.
        quantile: in (0, 1]; the length greedy decoding must be free to reach (nearest rank).
        max_perplexity_increase: > 0; e.g. 0.02 for at most 2 % (as predicted: the measured cost of a short
            fine-tune is at least this).

    Returns:
        :class:`EpsilonChoice`. A larger epsilon gives a shorter guarantee ``T(eps)`` and costs more.
    """
    values = sorted(_check_lengths(lengths))
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
    if not max_perplexity_increase > 0.0:
        raise ValueError(f"max_perplexity_increase must be > 0, got {max_perplexity_increase!r}")
    tail = values[max(0, math.ceil(quantile * len(values)) - 1)]
    by_tail = _epsilon_with_bound_at_least(tail)
    pairs_per_token = sum(n * (n - 1) for n in values) / (2 * sum(values))
    by_budget = -math.expm1(-math.log1p(max_perplexity_increase) / pairs_per_token) if pairs_per_token else 1.0
    epsilon, limited_by = (by_budget, "perplexity") if by_budget < by_tail else (by_tail, "tail")
    return EpsilonChoice(epsilon=epsilon, tail_length=tail, termination_bound=termination_bound(epsilon),
                         perplexity_factor=perplexity_tax(values, epsilon), limited_by=limited_by)


# ------------------------------------------------------------------------------------------ recipe
@torch.no_grad()
def fit_eos_row(model: Any, batches: Sequence[dict[str, torch.Tensor]], *, kind: str, eos_token_id: int) -> None:
    """Set the eos row of ``model``'s output layer so that an ST / NMST head starts where the model stands.

    The model's eos log-odds at a position are ``z - c`` (``z`` its eos logit, ``c`` the log-sum-exp of the
    others). NMST's sigmoid is ``p(eos)``: the row is fitted so that its logit is close to ``z - c``; ST's
    sigmoid is the probability to continue: close to ``c - z``. The fit is a ridge regression of those
    targets on the output layer's inputs at the positions of ``batches`` that read a real token other than eos
    (the bias too, if the layer has one). With tied embeddings the input embedding of eos changes with it,
    which matters only for text read after an eos.

    Raises:
        ValueError: the model's logits are not its output layer's output (e.g. scaled afterwards).
    """
    layer = model.get_output_embeddings()
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.append((inputs[0], output)))
    was_training = model.training
    model.eval()
    hidden_rows, targets = [], []
    try:
        for batch in batches:
            device = layer.weight.device
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            hidden, raw = captured.pop()
            if not torch.allclose(raw.float(), logits.float(), atol=1e-4, rtol=1e-4):
                raise ValueError("the model's logits are not its output layer's output: use eos_init='keep'")
            input_ids = batch["input_ids"].to(device)  # positions that read eos predict nothing: left out
            real = batch["attention_mask"].to(device).bool() & (input_ids != eos_token_id)
            raw = raw[real].double()  # [N, V]
            others = torch.cat([raw[:, :eos_token_id], raw[:, eos_token_id + 1 :]], dim=-1)
            log_odds = raw[:, eos_token_id] - torch.logsumexp(others, dim=-1)  # [N]
            targets.append((log_odds if kind == "nmst" else -log_odds).clamp(-30.0, 30.0))
            hidden_rows.append(hidden[real].double())
    finally:
        hook.remove()
        model.train(was_training)
    features, target = torch.cat(hidden_rows), torch.cat(targets)  # [N, H], [N]
    bias = getattr(layer, "bias", None)
    if bias is not None:
        features = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
    gram = features.T @ features
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    ridge = 1e-3 * gram.diagonal().mean().clamp_min(1e-12) * identity
    solution = torch.linalg.solve(gram + ridge, features.T @ target)
    layer.weight[eos_token_id] = solution[: layer.weight.shape[1]].to(layer.weight.dtype)
    if bias is not None:
        bias[eos_token_id] = solution[-1].to(bias.dtype)


def _check_recipe_options(steps: int, batch_size: int, lr: float, context_length: int, eos_init: str) -> None:
    for name, value, least in (("steps", steps, 0), ("batch_size", batch_size, 1), ("context_length", context_length, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if not lr > 0.0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if eos_init not in ("fit", "keep"):
        raise ValueError(f"eos_init must be 'fit' or 'keep', got {eos_init!r}")


def _with_eos(sequences: Sequence[Sequence[int]], eos: int, context_length: int) -> list[list[int]]:
    """Every sequence ending in eos; each must keep a token to predict after its context."""
    if len(sequences) == 0:
        raise ValueError("sequences is empty: pass token-id lists of the text to fine-tune on")
    out = []
    for index, sequence in enumerate(sequences):
        tokens = [int(token) for token in sequence]
        if not tokens or tokens[-1] != eos:
            tokens.append(eos)
        if len(tokens) <= max(context_length, 1):
            raise ValueError(f"sequences[{index}] has {len(tokens)} tokens with eos: nothing to predict after "
                             f"context_length={context_length} (and the first token)")
        out.append(tokens)
    return out


def finetune_self_terminating(
    model: Any,
    sequences: Sequence[Sequence[int]],
    *,
    kind: str,
    epsilon: float,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 5e-5,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    context_length: int = 0,
    eos_init: str = "fit",
    trainable: Callable[[str], bool] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SelfTerminatingLM:
    """Make ``model`` self-terminating and fine-tune it by MLE on ``sequences``; returns the new model.

    Args:
        model: a transformers causal LM (weights are shared with the result and trained in place).
        sequences: token-id lists, one document (or one prompt + answer) each; eos is appended where it is
            not the last token, since a sequence without it would teach the model never to stop.
        kind, epsilon: the head (:func:`decoding.make_self_terminating`); see :func:`choose_epsilon`.
        steps: AdamW updates (0: convert and fit the eos row only); batches cycle through ``sequences`` in a
            fresh seeded order per pass.
        batch_size: sequences per update (right-padded).
        lr: AdamW learning rate (gradient norm clipped to 1).
        eos_token_id: the eos whose output row feeds the sigmoid; defaults to the model's.
        pad_token_id: padding id; defaults to the model's, else eos (padding is never scored).
        context_length: leading tokens of every sequence that are context: not scored, ``p(eos) = 0`` and
            ``t`` not advanced there (use the prompt length when the model will continue prompts).
        eos_init: ``"fit"`` (:func:`fit_eos_row` on the first batches) or ``"keep"`` the output layer's row.
        trainable: which parameters train, by name (default: all).
        seed: the batch order.
        progress: show a tqdm bar.
    """
    _check_recipe_options(steps, batch_size, lr, context_length, eos_init)
    result = make_self_terminating(model, kind=kind, epsilon=epsilon, eos_token_id=eos_token_id)
    eos = result.eos_token_id
    pad = pad_token_id if pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    pad = eos if pad is None else int(pad)
    rows = _with_eos(sequences, eos, context_length)
    batches = [collate_lm_batch(rows[first : first + batch_size], pad_token_id=pad,
                                context_lengths=[context_length] * len(rows[first : first + batch_size]))
               for first in range(0, len(rows), batch_size)]  # fmt: skip
    if eos_init == "fit":
        fit_eos_row(model, batches[:4], kind=result.kind, eos_token_id=eos)
    parameters = [p for name, p in model.named_parameters() if trainable is None or trainable(name)]
    if steps and not parameters:
        raise ValueError("trainable selected no parameter")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable is None or trainable(name))
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device

    def pass_order(epoch: int) -> list[dict[str, torch.Tensor]]:
        """The batches of one pass, in a fresh seeded order (drawn on the host)."""
        order = torch.randperm(len(batches), generator=generator, device="cpu").tolist()
        return [batches[index] for index in reversed(order)]

    def update(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        loss = result(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      labels=batch["labels"].to(device)).loss  # fmt: skip
        gradient_step(loss, optimizer, parameters=parameters, clip=1.0)
        return {"loss": float(loss.detach())}

    position = LoopPosition()

    def steps_done(*_: object) -> str | None:
        return "steps" if position.updates >= steps else None

    result.train()
    run_loop(position, epoch_items=pass_order, update=update, after_update=steps_done, stop=steps_done,
             progress=Progress(f"fine-tune {kind} eps={epsilon:g}", total=steps, enabled=progress,
                               postfix=lambda logs: {"loss": f"{logs['loss']:.3f}"}))
    optimizer.zero_grad(set_to_none=True)
    return result.eval()
